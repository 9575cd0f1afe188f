"""The timed work of kernel autotuning: one training-shaped forward + backward per candidate.

`TuningShapes` is what a run's kernels see: the attention shape (heads, kv heads, head_dim,
dtype), one micro-batch's documents row by row (`rows`, from the sequence length and the
document-length distribution), the hidden size and LoRA rank, and the trainable tensors the
optimizer steps. `workload(family, candidate, shapes, device)` returns a zero-argument function
that runs one step of that candidate at those shapes, or None when the family (or this
candidate) has no workload here; `finetune.kernels.autotune` times it.

Attention is called the way a training batch reaches it: candidates that isolate documents as
varlen (`sdpa_varlen`, `varlen_attn`, the flash packages) get the micro-batch flattened into one
row of documents without padding; the dense paths (`sdpa`, `eager`, ...) get rows padded to the
longest, and packed rows a block-diagonal [B, 1, T, T] mask (`sdpa`, `eager`), as
finetune.data.collate builds them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from finetune.kernels.attention import AttentionCandidate, default_scale
from finetune.kernels.kernel_plan import TORCH_DTYPES
from finetune.kernels.lora_linear import fused_lora_forward
from finetune.kernels.optimizer import OptimizerCandidate
from finetune.kernels.registry import Candidate
from finetune.kernels.sdpa import repeat_kv, sdpa_forward
from finetune.kernels.varlen_sdpa import VARLEN_SDPA, varlen_sdpa_attention

Workload = Callable[[], None]
# Tokens of one timed micro-batch at most: tuning must stay within seconds, so a longer
# micro-batch is timed with fewer rows of the same length (never shorter rows).
MAX_TOKENS = {"cpu": 1024, "gpu": 65536}


@dataclass(frozen=True)
class TuningShapes:
    """The shapes candidates are timed at; `signature()` keys the cache."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # bf16 | fp16 | fp32
    rows: tuple[tuple[int, ...], ...]  # document lengths, row by row, of one micro-batch
    packing: bool
    hidden: int = 256
    lora_rank: int = 8
    trainable: tuple[tuple[int, ...], ...] = field(default=())  # the optimizer's tensors
    vocab: int = 0  # the LM head's rows (the loss head's workload); 0: not timed
    intermediate: int = 0  # the MLP's width: attention is timed with one MLP pass (0: none)

    @property
    def seq_len(self) -> int:
        """The longest row (a padded micro-batch's width)."""
        return max(sum(row) for row in self.rows)

    @property
    def tokens(self) -> int:
        return sum(sum(row) for row in self.rows)

    def signature(self) -> str:
        """A short stable hash of every field."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        docs = [n for row in self.rows for n in row]
        return (f"{len(self.rows)} rows x {self.seq_len} tokens, {len(docs)} documents "
                f"({min(docs)}-{max(docs)} tokens), heads {self.num_heads}/{self.num_kv_heads}, "
                f"head_dim {self.head_dim}, {self.dtype}")


def document_rows(seq_len: int, micro_batch: int, mean_document: int, *, packing: bool,
                  device_kind: str = "cpu", lengths: Sequence[int] = ()
                  ) -> tuple[tuple[int, ...], ...]:
    """One micro-batch's documents: `micro_batch` rows. Document lengths are taken in turn
    from `lengths` (a sample of the data's, see finetune.train.tuning) or, without them, around
    `mean_document` tokens (0.5x, 1x, 1.5x); each is at most `seq_len`. Packed rows are filled
    with documents up to `seq_len`; unpacked rows hold one document each. Rows are dropped
    (never shortened) beyond MAX_TOKENS for `device_kind` (cpu | gpu), keeping at least one."""
    mean = max(1, min(mean_document, seq_len))
    spread = [max(1, min(n, seq_len)) for n in lengths] or [
        mean // 2 or 1, mean, min(seq_len, mean + mean // 2)]
    rows: list[tuple[int, ...]] = []
    turn = 0
    for _ in range(micro_batch):
        if packing:
            row: list[int] = []
            while sum(row) < seq_len:
                row.append(min(spread[turn % len(spread)], seq_len - sum(row)))
                turn += 1
            rows.append(tuple(row))
        else:
            rows.append((spread[turn % len(spread)],))
            turn += 1
    budget = MAX_TOKENS[device_kind]
    while len(rows) > 1 and sum(map(sum, rows)) > budget:
        rows.pop()
    return tuple(rows)


def _inputs(shapes: TuningShapes, batch: int, length: int, device: str
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    dtype = TORCH_DTYPES[shapes.dtype]
    gen = torch.Generator().manual_seed(0)
    dims = [(batch, shapes.num_heads, length, shapes.head_dim),
            (batch, shapes.num_kv_heads, length, shapes.head_dim),
            (batch, shapes.num_kv_heads, length, shapes.head_dim)]
    qkv = [torch.randn(d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
           for d in dims]
    return qkv, torch.randn(dims[0], generator=gen).to(device=device, dtype=dtype)


class _Probe(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = groups


def _block_diagonal(rows: tuple[tuple[int, ...], ...], length: int, device: str) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal within each document of each packed row."""
    masks = []
    for row in rows:
        doc = torch.cat([torch.full((n,), i) for i, n in enumerate(row)]
                        + [torch.full((length - sum(row),), -1)])
        same = doc[:, None] == doc[None, :]
        masks.append(same & torch.ones(length, length, dtype=torch.bool).tril())
    return torch.stack(masks)[:, None].to(device)


def _masked_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  mask: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def attention_workload(candidate: AttentionCandidate, shapes: TuningShapes,
                       device: str) -> Workload | None:
    """Forward + backward of `candidate` on one micro-batch laid out as it would train."""
    if candidate.forward is None:
        return None
    forward = candidate.forward
    scale = default_scale(shapes.head_dim)
    lengths = [n for row in shapes.rows for n in row]
    if candidate.packing_isolation == "varlen":
        (q, k, v), grad = _inputs(shapes, 1, sum(lengths), device)
        if candidate.name == VARLEN_SDPA:
            probe = _Probe(shapes.num_heads // shapes.num_kv_heads)

            def call() -> torch.Tensor:
                out, _ = varlen_sdpa_attention(probe, q, k, v, None, scaling=scale,
                                               document_lengths=lengths)
                return out.transpose(1, 2)
        else:  # one call per document: the candidate's forward takes whole causal rows
            def call() -> torch.Tensor:
                parts = [forward(*(x.narrow(2, start, n) for x in (q, k, v)), scale)
                         for start, n in zip(_starts(lengths), lengths, strict=True)]
                return torch.cat(parts, dim=2)
    else:
        width = shapes.seq_len
        (q, k, v), grad = _inputs(shapes, len(shapes.rows), width, device)
        if shapes.packing and candidate.name in ("sdpa", "eager"):
            mask = _block_diagonal(shapes.rows, width, device)

            def call() -> torch.Tensor:
                if candidate.name == "sdpa":
                    return sdpa_forward(q, k, v, scale, mask=mask, causal=False)
                return _masked_eager(q, k, v, scale, mask)
        else:
            def call() -> torch.Tensor:
                return forward(q, k, v, scale)

    # The layout decides every layer's work, not only attention's: padded rows carry their
    # padding through the projections and the MLP too. One MLP pass over the tokens this
    # layout holds is timed with the attention.
    carried = q.shape[0] * q.shape[2]
    mlp = _mlp(shapes, carried, device)

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        call().backward(grad)
        if mlp is not None:
            mlp()

    return step


def _mlp(shapes: TuningShapes, tokens: int, device: str) -> Workload | None:
    """Forward + backward of a frozen up/down projection pair (hidden -> intermediate ->
    hidden) over `tokens` tokens; None without an MLP width."""
    if not shapes.intermediate:
        return None
    dtype = TORCH_DTYPES[shapes.dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, shapes.hidden, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_()
    up = (torch.randn(shapes.hidden, shapes.intermediate, generator=gen) * 0.02).to(device, dtype)
    down = (torch.randn(shapes.intermediate, shapes.hidden, generator=gen) * 0.02).to(device,
                                                                                      dtype)

    def step() -> None:
        x.grad = None
        (torch.nn.functional.silu(x @ up) @ down).sum().backward()

    return step


def _starts(lengths: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


def lora_workload(name: str, shapes: TuningShapes, device: str) -> Workload | None:
    """Forward + backward of one LoRA projection (hidden -> hidden, rank `lora_rank`) over
    the micro-batch's tokens: `fused` (one addmm_) or `peft` (peft's forward)."""
    if name not in ("fused", "peft"):
        return None
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    dtype = TORCH_DTYPES[shapes.dtype]
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(shapes.hidden, shapes.hidden,
                                                         bias=False)})
    config = LoraConfig(r=shapes.lora_rank, lora_alpha=2 * shapes.lora_rank,
                        target_modules=["proj"])
    model = inject_adapter_in_model(config, model)
    layer = model["proj"]
    layer.to(device)
    layer.base_layer.to(dtype).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shapes.tokens, shapes.hidden, generator=gen).to(device=device, dtype=dtype)
    autocast = dtype != torch.float32
    device_type = torch.device(device).type

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            out = fused_lora_forward(layer, x) if name == "fused" else None
            if out is None:
                out = layer(x)
        out.float().square().mean().backward()

    return step


def optimizer_workload(candidate: OptimizerCandidate, shapes: TuningShapes,
                       device: str) -> Workload | None:
    """One step of `candidate` over the run's trainable tensors (fp32, random gradients)."""
    if candidate.build is None or not shapes.trainable:
        return None
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
              for s in shapes.trainable]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    optimizer = candidate.build(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step() -> None:
        optimizer.step()

    return step


# Positions the loss head is timed over, at most: the unfused path holds [positions, vocab]
# logits and their gradient.
LOSS_POSITIONS = {"cpu": 256, "gpu": 8192}


def loss_head_workload(loss: Callable[..., torch.Tensor], shapes: TuningShapes,
                       device: str) -> Workload | None:
    """Forward + backward of a loss head `loss(hidden, weight, bias, targets, ignore_index)`
    (the LM head's matmul and the cross-entropy, summed) over the micro-batch's positions, with
    the head weight frozen as in an adapter run; None without a vocabulary size."""
    if not shapes.vocab:
        return None
    dtype = TORCH_DTYPES[shapes.dtype]
    kind = "cpu" if torch.device(device).type == "cpu" else "gpu"
    positions = min(shapes.tokens, LOSS_POSITIONS[kind])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, shapes.hidden, generator=gen).to(device=device, dtype=dtype)
    hidden.requires_grad_()
    weight = (torch.randn(shapes.vocab, shapes.hidden, generator=gen) * 0.02).to(device=device,
                                                                                 dtype=dtype)
    targets = torch.randint(0, shapes.vocab, (positions,), generator=gen).to(device)

    def step() -> None:
        hidden.grad = None
        loss(hidden, weight, None, targets, -100).backward()

    return step


# Candidates never timed, and why: they trade memory, not speed, against the others, so the
# faster one must not replace them.
NOT_TIMED: dict[tuple[str, str], str] = {
    ("fused_linear_cross_entropy", "unfused"):
        "materialises the whole logits: the loss heads' choice is a memory one",
}

# Workloads of families outside attention, LoRA, the optimizer and the loss heads, by (family,
# candidate name): a family whose candidates have no workload is not timed (the table's order
# stands).
EXTRA_WORKLOADS: dict[tuple[str, str], Callable[[TuningShapes, str], Workload | None]] = {}


def workload(family: str, candidate: Candidate, shapes: TuningShapes,
             device: str) -> Workload | None:
    """The timed step of `candidate` of `family` at `shapes` on `device`; None when there is
    none (the family is then not tuned)."""
    if (family, candidate.name) in NOT_TIMED:
        return None
    if family == "attention" and isinstance(candidate, AttentionCandidate):
        return attention_workload(candidate, shapes, device)
    if family == "lora":
        return lora_workload(candidate.name, shapes, device)
    if family == "optimizer" and isinstance(candidate, OptimizerCandidate):
        return optimizer_workload(candidate, shapes, device)
    extra = EXTRA_WORKLOADS.get((family, candidate.name))
    if extra is not None:
        return extra(shapes, device)
    loss = getattr(candidate, "loss", None)  # a loss-head candidate: its summed loss function
    return loss_head_workload(loss, shapes, device) if callable(loss) else None

