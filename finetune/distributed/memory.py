"""How much memory one device needs to train a model, estimated from its config alone.

`model_shape(hf_config)` counts the model's parameters and linear layers; a `Workload` adds
what is trained and how (adapter, batch, length, dtypes); `Workload.estimate(strategy, ...)`
gives a `MemoryEstimate` per device for one distributed strategy. `finetune.distributed.choose`
compares strategies with it. No weight is loaded, so the estimate is cheap enough for
`finetune validate` and `finetune env` and runs on every rank before the model is wrapped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from finetune.config.schema import PeftConfig
from finetune.kernels.chunked_loss import chunk_rows
from finetune.kernels.kernel_plan import TORCH_DTYPES

GIB = 2**30
# CUDA/HIP context, cuBLAS/hipBLASLt workspaces and collective buffers: about 0.5-1 GiB on
# current GPUs; the strategy choice keeps a further 10% free for allocator fragmentation. On the
# CPU the process itself lives in the memory it trains in: see `runtime_overhead`.
FIXED_OVERHEAD_BYTES = GIB
CPU_OVERHEAD_FROM = "this process before the model loads: Python, torch and libraries"
# Tokens a row when nothing says better (see finetune.distributed.choose.workload_from_run).
AUTO_SEQ_LEN = 2048
# bitsandbytes NF4 with double quantisation: 4 bits a weight, an 8-bit absmax per block of 64
# and an fp32 constant per 256 blocks (Dettmers et al. 2023, arXiv:2305.14314, section 3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes' 8-bit optimizers: each of AdamW's two states in int8 with an fp32 absmax per
# block of 256 (Dettmers et al. 2021, arXiv:2110.02861).
ADAM_8BIT_BYTES_PER_PARAM = 2 * (1 + 4 / 256)
# accelerate's DistributedDataParallel keeps torch's gradient_as_bucket_view=False, so its
# reducer holds a second copy of every gradient in its all-reduce buckets (torch DDP docs).
DDP_GRADIENT_COPIES = 2
SHARDED = ("fsdp2", "deepspeed_zero2", "deepspeed_zero3")
_DEEPSPEED = ("deepspeed_zero2", "deepspeed_zero3")
# Decoder families whose parameters are counted from the config; others are built on the
# meta device (no memory) and counted from the modules.
_BIASES = {  # model_type -> (q/k/v bias, o_proj bias, MLP bias) as a function of the config
    "llama": lambda c: (c.attention_bias, c.attention_bias, c.mlp_bias),
    "mistral": lambda c: (False, False, False),
    "qwen2": lambda c: (True, False, False),
    "qwen3": lambda c: (c.attention_bias, c.attention_bias, False),
}
_ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class Linear:
    """A linear layer: its qualified module name and shape."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a causal LM.

    `linears` are the linear layers peft's `all-linear` targets (every one but the output head);
    `layer_params` is one decoder layer; `outer_params` what lies outside the decoder layers
    (embeddings, final norm, output head), which FSDP2 keeps as the root's unit.
    """

    params: int
    layers: int
    layer_params: int
    outer_params: int
    linears: tuple[Linear, ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int | None = None


def model_shape(hf_config: Any) -> ModelShape:
    """Count a model's parameters and linear layers from its transformers config.

    Llama, Mistral, Qwen2 and Qwen3 are counted from the config's sizes; any other architecture
    is instantiated on the meta device (no memory is allocated) and its modules counted.
    """
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    inter = getattr(c, "intermediate_size", None) or 4 * h
    context = getattr(c, "max_position_embeddings", None)
    sizes = {"hidden": h, "heads": heads, "kv_heads": kv, "head_dim": hd, "intermediate": inter,
             "vocab": c.vocab_size, "context": context if isinstance(context, int) else None}
    if c.model_type not in _BIASES:
        return _meta_model_shape(hf_config, layers, sizes)
    qkv_bias, o_bias, mlp_bias = (bool(b) for b in _BIASES[c.model_type](c))
    per_layer = (("self_attn.q_proj", h, heads * hd, qkv_bias),
                 ("self_attn.k_proj", h, kv * hd, qkv_bias),
                 ("self_attn.v_proj", h, kv * hd, qkv_bias),
                 ("self_attn.o_proj", heads * hd, h, o_bias),
                 ("mlp.gate_proj", h, inter, mlp_bias),
                 ("mlp.up_proj", h, inter, mlp_bias),
                 ("mlp.down_proj", inter, h, mlp_bias))
    linears = tuple(Linear(f"model.layers.{i}.{name}", n_in, n_out, bias)
                    for i in range(layers) for name, n_in, n_out, bias in per_layer)
    norms = 2 * h + (2 * hd if c.model_type == "qwen3" else 0)  # qwen3: q_norm and k_norm too
    layer_params = norms + sum(n_in * n_out + (n_out if bias else 0)
                               for _, n_in, n_out, bias in per_layer)
    head = 0 if getattr(c, "tie_word_embeddings", False) else c.vocab_size * h
    outer = c.vocab_size * h + h + head
    return ModelShape(params=layers * layer_params + outer, layers=layers,
                      layer_params=layer_params, outer_params=outer, linears=linears, **sizes)


def _meta_model_shape(hf_config: Any, layers: int, sizes: dict[str, Any]) -> ModelShape:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    head = model.get_output_embeddings()
    linears = tuple(Linear(name, m.in_features, m.out_features, m.bias is not None)
                    for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    block_sizes = [sum(p.numel() for p in m.parameters())
                   for m in model.modules() if type(m).__name__ in blocks]
    params = sum(p.numel() for p in model.parameters())
    return ModelShape(params=params, layers=layers, layer_params=max(block_sizes, default=params),
                      outer_params=params - sum(block_sizes), linears=linears, **sizes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds at the peak of a training step, by kind.

    weights: the parameters it keeps (its shard, when sharded); gathered: parameters gathered
    unsharded for compute (fsdp2, ZeRO-3) or dequantized (QLoRA); weight_copies: the
    compute-dtype copies of fp32 trainable weights that autocast keeps for the backward;
    reference: a frozen reference model (DPO of a full fine-tune); gradients, optimizer,
    activations; overhead: FIXED_OVERHEAD_BYTES. `host`: bytes this process keeps in host
    memory (cpu offload), not part of `total`.
    """

    strategy: str
    world_size: int
    cpu_offload: bool
    params: int
    trainable_params: int
    rows: int
    seq_len: int
    gradient_checkpointing: bool
    weights: int
    gathered: int
    weight_copies: int
    reference: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    host: int
    overhead_from: str = ""
    tokens: int = 0

    @property
    def total(self) -> int:
        """Bytes on the device."""
        return (self.weights + self.gathered + self.weight_copies + self.reference
                + self.gradients + self.optimizer + self.activations + self.overhead)

    def describe(self) -> str:
        """A few lines: each kind in GiB, the total per device and what goes to host memory."""
        over = (f"{self.strategy} over {self.world_size} processes" if self.world_size > 1
                else f"{self.strategy}, one process")
        extras = [(self.gathered, "gathered for compute"),
                  (self.weight_copies, "autocast copies"), (self.reference, "reference model")]
        extra = ", ".join(f"+{format_bytes(size)} {what}" for size, what in extras if size)
        ckpt = "gradient checkpointing" if self.gradient_checkpointing else "no checkpointing"
        lines = [f"memory per device ({over}{', cpu offload' if self.cpu_offload else ''}):",
                 f"  weights      {format_bytes(self.weights)}" + (f" ({extra})" if extra else ""),
                 f"  gradients    {format_bytes(self.gradients)}",
                 f"  optimizer    {format_bytes(self.optimizer)}",
                 f"  activations  {format_bytes(self.activations)} "
                 f"({self.micro_batch()}, {ckpt})",
                 f"  overhead     {format_bytes(self.overhead)}"
                 + (f" ({self.overhead_from})" if self.overhead_from else ""),
                 f"  total        {format_bytes(self.total)}"]
        if self.host:
            lines.append(f"  host         {format_bytes(self.host)} per process (offloaded)")
        return "\n".join(lines)

    def micro_batch(self) -> str:
        """'8 x 2048 tokens', or for padding-free rows '8 rows of up to 64 tokens, 195 tokens
        on average (padding-free)'."""
        if not self.tokens or self.tokens >= self.rows * self.seq_len:
            return f"{self.rows} x {self.seq_len} tokens"
        return (f"{self.rows} rows of up to {self.seq_len} tokens, {self.tokens} tokens on "
                "average (padding-free)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; sizes in bytes."""
        kinds = ("weights", "gathered", "weight_copies", "reference", "gradients", "optimizer",
                 "activations", "overhead")
        return {"strategy": self.strategy, "world_size": self.world_size,
                "cpu_offload": self.cpu_offload, "params": self.params,
                "trainable_params": self.trainable_params, "rows": self.rows,
                "seq_len": self.seq_len, "tokens": self.tokens,
                "gradient_checkpointing": self.gradient_checkpointing,
                "bytes": {**{k: getattr(self, k) for k in kinds}, "total": self.total,
                          "host": self.host}}


def format_bytes(num_bytes: float) -> str:
    """`num_bytes` for a reader: '24.3 GiB', or '310 MiB' below a GiB."""
    if num_bytes < GIB:
        return f"{num_bytes / 2**20:.0f} MiB"
    return f"{num_bytes / GIB:.1f} GiB"


def _itemsize(dtype: torch.dtype | str) -> int:
    return (TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype).itemsize


@dataclass(frozen=True)
class Workload:
    """What is trained and how: every input of the estimate except the strategy.

    `pairs`: each micro-batch row is a preference pair (two sequences). `seq_len`: tokens a row,
    the upper bound (unpacked rows are padded to the longest of their batch, packed rows fill
    it). `seq_len_from` says how `seq_len` was decided, for the display. `mean_row_tokens`: the
    data's mean tokens a row when its micro-batches are padding-free rows (data.padding_free:
    the rows are concatenated without padding, so a micro-batch holds about rows x this many
    tokens); None: rows x seq_len. `overhead`: bytes the
    device holds before the model (`runtime_overhead`), `overhead_from` what they are.
    `reference_model`: a frozen copy of the model in
    the compute dtype sits on every device (DPO of a full fine-tune without
    dpo.precompute_ref). `reshard_after_forward`: distributed.reshard_after_forward (fsdp2).
    """

    shape: ModelShape
    peft_method: str = "lora"
    lora_r: int = 16
    target_modules: Any = "all-linear"
    peft_bias: str = "none"
    micro_batch_size: int = 1
    pairs: bool = False
    seq_len: int = AUTO_SEQ_LEN
    gradient_checkpointing: bool = False
    base_dtype: torch.dtype | str = torch.bfloat16
    trainable_dtype: torch.dtype | str = torch.float32
    compute_dtype: torch.dtype | str = torch.bfloat16
    optimizer: str = "adamw"
    fused_linear_cross_entropy: bool = False
    chunked_loss: bool = False
    eager_attention: bool = False
    reference_model: bool = False
    reshard_after_forward: bool = True
    seq_len_from: str = ""
    overhead: int = FIXED_OVERHEAD_BYTES
    overhead_from: str = ""
    mean_row_tokens: float | None = None

    @property
    def rows(self) -> int:
        """Sequences in one micro-batch."""
        return self.micro_batch_size * (2 if self.pairs else 1)

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch: rows x seq_len, or for padding-free rows rows x their
        mean length (at most that)."""
        bound = self.rows * self.seq_len
        if self.mean_row_tokens is None:
            return bound
        return min(bound, math.ceil(self.rows * self.mean_row_tokens))

    @property
    def full(self) -> bool:
        """True for a full fine-tune (peft.method=none)."""
        return str(self.peft_method) == "none"

    def targeted(self) -> list[Linear]:
        """The linear layers the adapter wraps, matched as peft matches `target_modules`."""
        targets = self.target_modules
        if targets == "all-linear":
            return list(self.shape.linears)
        if isinstance(targets, str):
            return [lin for lin in self.shape.linears if re.fullmatch(targets, lin.name)]
        names = [str(t) for t in targets]
        return [lin for lin in self.shape.linears
                if any(lin.name == t or lin.name.endswith(f".{t}") for t in names)]

    def adapter_params(self) -> int:
        """Parameters the adapter adds: r * (in + out) per wrapped layer, plus DoRA's
        magnitude vector (out)."""
        if self.full:
            return 0
        dora = str(self.peft_method) == "dora"
        return sum(self.lora_r * (lin.in_features + lin.out_features)
                   + (lin.out_features if dora else 0) for lin in self.targeted())

    def trainable_params(self) -> int:
        """Parameters that train: every one (full fine-tune), else the adapter's plus the
        biases peft.bias makes trainable."""
        if self.full:
            return self.shape.params
        bias = str(self.peft_bias)
        layers = self.shape.linears if bias == "all" else self.targeted()
        biases = sum(lin.out_features for lin in layers if lin.bias) if bias != "none" else 0
        return self.adapter_params() + biases

    def summary(self) -> str:
        """'full fine-tune of 8.0B params' or 'LoRA r=16 on 8.0B params (42M trainable)'."""
        size = _count(self.shape.params)
        if self.full:
            return f"full fine-tune of {size} params"
        name = _ADAPTER_NAMES.get(str(self.peft_method), str(self.peft_method))
        trainable = _count(self.trainable_params())
        return f"{name} r={self.lora_r} on {size} params ({trainable} trainable)"

    def estimate(self, strategy: str, world_size: int = 1,
                 cpu_offload: bool = False) -> MemoryEstimate:
        """Bytes per device under `strategy` (single|ddp|fsdp2|deepspeed_zero2|deepspeed_zero3)
        over `world_size` processes.

        single and ddp hold everything on every device (ddp: a second copy of the gradients in
        its buckets). fsdp2 divides weights, gradients and optimizer state by the world size
        and adds the units it gathers: the root's (embeddings, norm, head), gathered at the peak
        (the loss, between the forward's end and the backward's start), and two decoder layers
        (the current one and the prefetched next), or all of them with
        reshard_after_forward=false; the gradients of the root and of one layer exist unsharded
        until reduce-scattered. With cpu_offload, fsdp2 keeps
        parameters, gradients and optimizer state in host memory (CPUOffloadPolicy). DeepSpeed
        holds trainable weights and gradients in the compute dtype and fp32 master weights plus
        AdamW's two states in the optimizer (Rajbhandari et al. 2020, arXiv:1910.02054): ZeRO-2
        shards gradients and optimizer state, ZeRO-3 the weights too; its cpu offload moves the
        optimizer state to host memory.
        """
        strategy = str(strategy)
        if strategy not in ("single", "ddp", *SHARDED):
            raise ValueError(f"no memory estimate for strategy {strategy!r}")
        n = world_size if strategy in SHARDED else 1
        s, trainable = self.shape, self.trainable_params()
        b_base, b_train = _itemsize(self.base_dtype), _itemsize(self.trainable_dtype)
        b_comp = _itemsize(self.compute_dtype)
        deepspeed = strategy in _DEEPSPEED
        # DeepSpeed keeps the trainable weights in 16 bits (fp32 masters live in the optimizer).
        b_weight = b_comp if deepspeed else b_train
        frozen, layer_bytes, root_bytes = self._stored_bytes(b_base, b_weight)
        shards_weights = n if strategy in ("fsdp2", "deepspeed_zero3") else 1
        weights = (frozen + trainable * b_weight) // shards_weights
        grads = trainable * b_weight // n
        optimizer = int(trainable * self._optimizer_bytes(deepspeed, b_comp, b_train)) // n
        if strategy == "ddp":
            grads *= DDP_GRADIENT_COPIES
        gathered = unsharded_grads = host = 0
        # fsdp2 gathers in the compute dtype (MixedPrecisionPolicy.param_dtype), so autocast
        # keeps no second copy of the weights.
        fsdp2_cast = strategy == "fsdp2" and b_comp < b_train
        if fsdp2_cast:
            _, layer_bytes, root_bytes = self._stored_bytes(min(b_base, b_comp), b_comp)
        if shards_weights > 1 or strategy == "fsdp2":
            gathered = root_bytes + layer_bytes * (2 if self.reshard_after_forward else s.layers)
        if strategy == "fsdp2":
            layer_trainable = s.layer_params if self.full else trainable // max(s.layers, 1)
            root_trainable = s.outer_params if self.full else 0
            unsharded_grads = (root_trainable + layer_trainable) * b_train
            if cpu_offload:
                host, weights, grads, optimizer = weights + grads + optimizer, 0, 0, 0
        elif cpu_offload and deepspeed:
            host, optimizer = optimizer, 0
        if str(self.peft_method) == "qlora":  # one linear dequantized for its matmul
            gathered += max((lin.in_features * lin.out_features for lin in s.linears),
                            default=0) * b_comp
        return MemoryEstimate(
            strategy=strategy, world_size=world_size, cpu_offload=cpu_offload,
            params=s.params, trainable_params=trainable, rows=self.rows, seq_len=self.seq_len,
            gradient_checkpointing=self.gradient_checkpointing, weights=weights,
            gathered=gathered,
            weight_copies=(0 if deepspeed or fsdp2_cast
                           else self._autocast_copies(b_train, b_comp)),
            reference=s.params * b_comp if self.reference_model else 0,
            gradients=grads + unsharded_grads, optimizer=optimizer,
            activations=self.activation_bytes(), overhead=self.overhead, host=host,
            overhead_from=self.overhead_from, tokens=self.tokens)

    def _stored_bytes(self, b_base: int, b_weight: int) -> tuple[int, int, int]:
        """(frozen bytes, one decoder layer's bytes, the root unit's bytes) as stored."""
        s = self.shape
        if self.full:
            return 0, s.layer_params * b_weight, s.outer_params * b_weight
        trainable = self.trainable_params()
        layer_adapter = trainable // max(s.layers, 1) * b_weight
        if str(self.peft_method) != "qlora":
            frozen = (s.params - trainable + self.adapter_params()) * b_base
            return frozen, s.layer_params * b_base + layer_adapter, s.outer_params * b_base
        # QLoRA: every linear weight but the head in 4-bit; the rest stays in the base dtype.
        quantized = sum(lin.in_features * lin.out_features for lin in s.linears)
        rest = s.params - quantized
        biases = trainable - self.adapter_params()  # base biases that train (peft.bias)
        frozen = int(quantized * NF4_BYTES_PER_PARAM) + (rest - biases) * b_base
        layer_quantized = quantized // max(s.layers, 1)
        layer = (int(layer_quantized * NF4_BYTES_PER_PARAM)
                 + (s.layer_params - layer_quantized) * b_base + layer_adapter)
        return frozen, layer, s.outer_params * b_base

    def _optimizer_bytes(self, deepspeed: bool, b_comp: int, b_train: int) -> float:
        """AdamW's state per trainable parameter: two states in the parameter's dtype (torch
        allocates them like the parameter), 8-bit for bitsandbytes' optimizers; DeepSpeed adds
        an fp32 master copy when it trains in 16 bits."""
        if deepspeed:
            return 8 + (4 if b_comp < 4 else 0)
        if "8bit" in self.optimizer:
            return ADAM_8BIT_BYTES_PER_PARAM
        return 2 * b_train

    def _autocast_copies(self, b_train: int, b_comp: int) -> int:
        """Autocast casts each fp32 trainable weight of a linear layer to the compute dtype,
        and the backward keeps that copy (with checkpointing, only one layer's and the
        head's at a time)."""
        if b_train <= b_comp:
            return 0
        s = self.shape
        if self.full:
            linear = sum(lin.in_features * lin.out_features for lin in s.linears)
            head = s.vocab * s.hidden
            if self.gradient_checkpointing:
                linear //= max(s.layers, 1)
            return (linear + head) * b_comp
        adapter = self.adapter_params()
        return (adapter // max(s.layers, 1) if self.gradient_checkpointing else adapter) * b_comp

    def activation_bytes(self) -> int:
        """Activations at the peak of a step: the sum of `activation_parts()`."""
        return sum(self.activation_parts().values())

    def activation_parts(self) -> dict[str, int]:
        """Activations of the `tokens` of one micro-batch, in bytes: kept by the decoder layers for
        the backward (`layers`), the one layer recomputed at a time under gradient
        checkpointing (`recomputed`), kept outside the layers (`outside`), the logits' part
        kept for the backward (`logits_kept`) and the part alive only while the loss is
        computed (`logits_transient`).

        Per decoder layer and token, after Korthikanti et al. 2022 ("Reducing Activation
        Recomputation in Large Transformer Models", arXiv:2205.05198, section 4.1), adapted to
        today's decoders and checked tensor by tensor against what autograd saves for
        transformers' Llama (tests/unit/distributed/test_memory.py). With c the compute dtype's
        size and r the residual stream's (the trainable dtype in a full fine-tune, else the base
        dtype): no dropout; each RMSNorm keeps an fp32 copy of its input (4h) and, when its
        weight trains, its normalised output (r*h); q, k and v after RoPE (c*(heads + 2*kv) *
        head_dim), the attention output (c*heads*head_dim) and flash attention's fp32
        log-sum-exp (4*heads), but no s x s scores (flash and memory-efficient attention;
        eager attention adds its fp32 softmax and a compute-dtype copy, heads*s*(4 + c));
        SwiGLU's gate, activated gate and up (3*c*i). Linear inputs: a full fine-tune keeps the
        q/k/v and gate/up inputs (cast from the fp32 stream once per layer that reads them, so
        5*c*h, else 2*c*h) and down's input (c*i); an adapter keeps a compute-dtype copy of each
        wrapped layer's input (peft casts it to the adapter's dtype) and its r-wide product.
        With gradient checkpointing each layer keeps only its input (r*h) and one layer is
        recomputed at a time. Outside the layers: the final norm, the head's input (full
        fine-tune) and the logits: the fp32 log-softmax kept for the backward, and while the
        loss is computed the head's output and its fp32 upcast (vocab*(c + 8)); fused linear
        cross-entropy never holds them, counted as two fp32 hidden states. The chunked loss
        (`chunked_loss`, finetune.kernels.chunked_loss) keeps the gradient of the head's input
        (r*h a token) and, when the head trains, its weight's fp32 gradient (4*vocab*h); while
        the loss is computed, one chunk of `chunk_rows(vocab)` positions holds its fp32 logits
        and one more fp32 or compute-dtype copy of them (8 bytes an element at the peak).
        """
        s, c = self.shape, _itemsize(self.compute_dtype)
        r = _itemsize(self.trainable_dtype if self.full else self.base_dtype)
        h, layers = s.hidden, max(s.layers, 1)
        core = (c * (s.heads + 2 * s.kv_heads) * s.head_dim + c * s.heads * s.head_dim
                + 4 * s.heads + 3 * c * s.intermediate)
        if self.eager_attention:
            core += s.heads * self.seq_len * (4 + c)
        if self.full:
            norms = 4 * h + r * h
            inputs = (5 if r != c else 2) * c * h + c * s.intermediate
            outside = norms + c * h
        else:
            norms = 4 * h
            inputs = sum(c * (lin.in_features + self.lora_r) for lin in self.targeted()) // layers
            outside = norms
        layer = 2 * norms + core + inputs
        tokens = self.tokens
        fused = self.fused_linear_cross_entropy
        if self.chunked_loss and not fused:
            rows = min(tokens, chunk_rows(s.vocab))
            kept = tokens * r * h + (4 * s.vocab * h if self.full else 0)
            transient = rows * s.vocab * 8
        else:
            kept = tokens * (2 * 4 * h if fused else 4 * s.vocab)
            transient = 0 if fused else tokens * (c + 4) * s.vocab
        return {
            "layers": tokens * s.layers * (r * h if self.gradient_checkpointing else layer),
            "recomputed": tokens * layer if self.gradient_checkpointing else 0,
            "outside": tokens * outside,
            "logits_kept": kept,
            "logits_transient": transient,
        }


def runtime_overhead(vendor: str) -> tuple[int, str]:
    """(bytes, what they are) that a device holds before the model loads. A GPU:
    FIXED_OVERHEAD_BYTES (its runtime's context and workspaces). The CPU: this process's
    resident memory now (Python, torch and the libraries imported so far), since there the
    process lives in the memory it trains in and its measured peak counts it; call it before
    the model loads."""
    if vendor != "cpu":
        return FIXED_OVERHEAD_BYTES, ""
    import psutil

    return psutil.Process().memory_info().rss, CPU_OVERHEAD_FROM


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def estimate_memory(hf_config: Any, *, peft: PeftConfig, micro_batch_size: int, seq_len: int,
                    gradient_checkpointing: bool, base_dtype: torch.dtype | str,
                    trainable_dtype: torch.dtype | str, compute_dtype: torch.dtype | str,
                    strategy: str, world_size: int = 1, cpu_offload: bool = False,
                    optimizer: str = "adamw", fused_linear_cross_entropy: bool = False,
                    chunked_loss: bool = False, eager_attention: bool = False, reference_model: bool = False,
                    reshard_after_forward: bool = True) -> MemoryEstimate:
    """The memory one device needs to train the model `hf_config` describes.

    `peft` is the run's PeftConfig (method, r, target_modules, bias); dtypes are torch dtypes
    or bf16|fp16|fp32. See `Workload.estimate` for what each strategy holds and
    `Workload.activation_bytes` for the activation formula.
    """
    workload = Workload(
        shape=model_shape(hf_config), peft_method=str(peft.method), lora_r=peft.r,
        target_modules=peft.target_modules, peft_bias=str(peft.bias),
        micro_batch_size=micro_batch_size,
        seq_len=seq_len, gradient_checkpointing=gradient_checkpointing, base_dtype=base_dtype,
        trainable_dtype=trainable_dtype, compute_dtype=compute_dtype, optimizer=optimizer,
        fused_linear_cross_entropy=fused_linear_cross_entropy, chunked_loss=chunked_loss,
        eager_attention=eager_attention,
        reference_model=reference_model, reshard_after_forward=reshard_after_forward)
    return workload.estimate(strategy, world_size, cpu_offload)
