"""Linear + cross-entropy one chunk of positions at a time, in plain torch (any device).

The LM head's logits of N positions over a vocabulary of V are N*V floats: with a Llama-3
vocabulary (128,256) at 2048 positions, 1 GB in fp32, and the same again for their gradient.
Here the head runs on `chunk_rows` positions at a time; each chunk's loss and its gradients with
respect to the hidden states and (when it trains) the head's weight are computed at once, in
the forward, and the chunk's logits are dropped before the next one. What the backward keeps
is the gradient with respect to the hidden states ([N, H], the size of the head's input) and
the weight's ([V, H] fp32, only when the head trains). Computing the gradients in the forward
saves the head's second matmul that a recomputing backward would pay; it is what Liger's fused
linear cross-entropy does in Triton (linkedin/Liger-Kernel).

Two reductions share the chunked path: the summed token cross-entropy (SFT, eval), and the
per-position log-probability of the label (DPO sums it per sequence). Logits are computed in
the compute dtype (the autocast dtype, else the inputs') and reduced in fp32, as the unfused
`F.cross_entropy(logits.float(), ...)` does.

`ChunkedLossHead` is the model side: an `nn.Linear` (same parameters and state-dict keys)
whose forward, while a loss is requested (`request_loss`), returns that loss instead of
logits, so a model called with `logits_to_keep` never builds its logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# One chunk's fp32 logits take at most this many bytes; the chunk's transient peak is about
# twice it (the logits and log-sum-exp's temporary). Each chunk reads the whole head weight
# twice, so smaller chunks cost time where that weight outgrows the caches: on a 2-core CPU at
# vocab 128,256 and hidden 256, 130-position chunks (64 MiB) took 1.35x the unfused loss's CPU
# time and 65-position ones (32 MiB) 1.5x (scripts/bench_loss_head.py).
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits fit `budget` bytes (at least 1)."""
    return max(1, budget // (4 * vocab))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor,
           valid: torch.Tensor, per_token: bool,
           grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: (its values [C] fp32, d values / d logits in the compute dtype or None).

    Values are the token losses (0 where ignored), or with `per_token` the label's
    log-probabilities (0 where ignored)."""
    logits = F.linear(h, w, b).float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    values = (picked - lse) if per_token else (lse - picked)
    values = values.masked_fill(~valid, 0.0)
    if not grad:
        return values, None
    probs = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' memory
    probs.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    probs.mul_(valid[:, None])  # d loss / d logits = softmax - one-hot, 0 where ignored
    if per_token:
        probs.neg_()  # d log p(label) / d logits = one-hot - softmax
    return values, probs.to(h.dtype)


@dataclass
class _Grads:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         targets: torch.Tensor, ignore_index: int, per_token: bool, rows: int,
         want: tuple[bool, bool, bool], upstream: torch.Tensor | None = None,
         ) -> tuple[torch.Tensor, _Grads]:
    """Every chunk in turn: the values [N] (fp32) and the gradients `want` asks for
    (hidden, weight, bias). `upstream` ([N], per-token mode) scales each position's gradient."""
    compute = _compute_dtype(hidden, weight)
    w = weight.to(compute)
    b = None if bias is None else bias.to(compute)
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    n = hidden.shape[0]
    values = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grads = _Grads(
        torch.empty_like(hidden) if want[0] else None,
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None,
        None if (bias is None or not want[2])
        else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device),
    )
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            h = hidden[part].to(compute)
            values[part], g = _chunk(h, w, b, safe[part], valid[part], per_token, any(want))
            if g is None:
                continue
            if upstream is not None:
                g = g * upstream[part, None].to(g.dtype)
            if grads.hidden is not None:
                grads.hidden[part] = g @ w
            if grads.weight is not None and g.dtype == grads.weight.dtype:
                grads.weight.addmm_(g.t(), h)  # in place: no [V, H] temporary per chunk
            elif grads.weight is not None:
                grads.weight += (g.t() @ h).float()
            if grads.bias is not None:
                grads.bias += g.float().sum(0)
    return values, grads


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, per_token: bool,
                rows: int) -> torch.Tensor:
        need = ctx.needs_input_grad
        # A per-position result's weight gradient depends on each position's upstream gradient,
        # unknown here: that one is computed in the backward, by running the chunks again.
        defer = per_token and (need[1] or need[2])
        values, grads = _run(hidden, weight, bias, targets, ignore_index, per_token, rows,
                             (need[0], need[1] and not defer, need[2] and not defer))
        ctx.per_token, ctx.defer, ctx.ignore_index, ctx.rows = per_token, defer, ignore_index, rows
        ctx.grads = grads
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if defer:
            ctx.save_for_backward(hidden, weight, bias, targets)
        return values if per_token else values.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads: _Grads = ctx.grads
        ctx.grads = None
        scale = grad_out.float()[:, None] if ctx.per_token else grad_out.float()
        hidden = None
        if grads.hidden is not None:
            hidden = (grads.hidden.float() * scale).to(grads.hidden.dtype)
        if ctx.defer:
            h, w, b, targets = ctx.saved_tensors
            need = ctx.needs_input_grad
            _, again = _run(h, w, b, targets, ctx.ignore_index, True, ctx.rows,
                            (False, need[1], need[2]), upstream=grad_out.float())
            weight, bias = again.weight, again.bias
        else:
            weight = None if grads.weight is None else grads.weight * scale
            bias = None if grads.bias is None else grads.bias * scale
        weight = None if weight is None else weight.to(ctx.weight_dtype)
        bias = None if bias is None else bias.to(ctx.bias_dtype)
        return hidden, weight, bias, None, None, None, None


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.dim() != 2:
        raise ValueError(
            f"chunked loss: hidden must be [N, H], weight [V, H] and targets [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (0-d, fp32) of `F.linear(hidden, weight, bias)` against `targets`,
    positions equal to `ignore_index` skipped: `F.cross_entropy(logits.float(), targets,
    reduction="sum")` without ever holding more than `rows` positions' logits (default
    `chunk_rows(V)`). hidden: [N, H]; weight: [V, H]; targets: [N]."""
    _check(hidden, weight, targets)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, False,
                                     rows or chunk_rows(weight.shape[0]))


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       bias: torch.Tensor | None = None, ignore_index: int = -100,
                       rows: int | None = None) -> torch.Tensor:
    """[N] fp32 log-probability of each position's label under `F.linear(hidden, weight,
    bias)`, 0 where the label is `ignore_index`; chunked like `linear_cross_entropy`."""
    _check(hidden, weight, targets)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, True,
                                     rows or chunk_rows(weight.shape[0]))


@dataclass
class LossRequest:
    """What a `ChunkedLossHead` computes instead of logits during one forward: the targets of
    the positions it is handed ([B, K], or [N] for flattened positions), and the reduction
    (`sum`: the summed cross-entropy, 0-d; `token_logps`: [B, K] label log-probabilities)."""

    targets: torch.Tensor
    reduction: str = "sum"
    ignore_index: int = -100


class ChunkedLossHead(torch.nn.Linear):
    """An LM head that, while `loss_request` is set, returns that loss through the chunked
    path instead of logits. Otherwise (generation, a loss computed by the model) it is the
    plain `nn.Linear` it replaced: same parameters, same state-dict keys."""

    loss_request: LossRequest | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request = self.loss_request
        if request is None:
            return super().forward(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = request.targets.reshape(-1).to(hidden.device)
        if request.reduction == "sum":
            return linear_cross_entropy(flat, self.weight, targets, bias=self.bias,
                                        ignore_index=request.ignore_index)
        return linear_token_logps(flat, self.weight, targets, bias=self.bias,
                                  ignore_index=request.ignore_index).view(request.targets.shape)


# Config fields of model families whose forward rescales the logits after the head (Gemma 2/3
# soft-capping, Cohere's logit_scale, Granite's logits_scaling): the head's own output would be
# rescaled again, so those models keep the unfused loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunked_head_of(model: torch.nn.Module) -> ChunkedLossHead | None:
    """The model's installed `ChunkedLossHead` (through DDP / DeepSpeed `.module` and peft
    wrappers), else None."""
    inner = model
    for _ in range(8):
        if isinstance(inner, torch.nn.Module) and hasattr(inner, "get_output_embeddings"):
            break
        inner = getattr(inner, "module", None)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, ChunkedLossHead) else None


def install_chunked_head(model: torch.nn.Module) -> tuple[bool, str]:
    """Turn the model's LM head into a `ChunkedLossHead` in place; (installed, why)."""
    config = getattr(model, "config", None)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return False, f"the model rescales its logits after the head ({name}={value})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear and not isinstance(head, ChunkedLossHead):
        return False, f"the LM head is {type(head).__name__}, not a plain nn.Linear"
    head.__class__ = ChunkedLossHead
    return True, "the LM head computes the loss a chunk of positions at a time"


@contextlib.contextmanager
def request_loss(head: ChunkedLossHead, targets: torch.Tensor, reduction: str = "sum",
                 ignore_index: int = -100) -> Iterator[None]:
    """While inside, `head` returns the loss of `targets` (see `LossRequest`) instead of
    logits."""
    if reduction not in ("sum", "token_logps"):
        raise ValueError(f"unknown chunked-loss reduction {reduction!r}: sum or token_logps")
    head.loss_request = LossRequest(targets, reduction, ignore_index)
    try:
        yield
    finally:
        head.loss_request = None
