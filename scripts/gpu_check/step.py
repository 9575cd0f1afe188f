"""step: the step a user runs, measured. A Llama-3-8B-shaped model (random init, the run's dtype,
vocabulary 128,256; fewer layers than 8B's 32, stated in the result), LoRA r=16 on every linear
layer, packed rows of 2048 tokens holding about 8 documents each. For every attention that keeps
documents apart here: one warm-up step, then timed optimizer steps taken as finetune's trainer
takes them; then the plan's attention with peft's LoRA forward. Each run reports tokens/s, MFU
against the profile's peak, peak memory and its loss after the steps; the losses must agree.

`optimizer_step` and `step_batches` are shared with the syncs and op_profile sections."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from .context import (
    LLAMA3_8B_LAYERS,
    Context,
    candidates,
    packed_candidate,
    peak_gib,
    register_attention,
    reset_peak,
    sync,
    to_device,
    unsupported,
    use_attention,
)
from .runner import Skip

LORA_RANK = 16


@dataclass
class StepBatch:
    """One packed batch on the device, with what the trainer computes on the host."""

    batch: dict[str, Any]
    trained: int  # trained tokens (the loss's denominator)
    tokens: int  # input tokens
    doc_lengths: list[int]


def packed_rows(ctx: Context, seed: int) -> list[list[tuple[Any, Any]]]:
    """`step_rows` rows of exactly `step_seq` tokens, each cut into `step_docs` documents of
    random lengths. Every token but each document's first is trained, so no loss term crosses
    a document and the losses of every layout (one varlen row, or rows with masks) agree."""
    import numpy as np

    seq, docs, vocab = ctx.sizes.step_seq, ctx.sizes.step_docs, ctx.sizes.step_model[5]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(ctx.sizes.step_rows):
        cuts = np.sort(rng.choice(np.arange(2, seq - 1), size=docs - 1, replace=False))
        lengths = np.diff([0, *cuts.tolist(), seq])
        rows.append([(rng.integers(1, vocab, n), np.arange(n) > 0) for n in lengths])
    return rows


def step_batches(ctx: Context, isolation: str | None, count: int) -> list[StepBatch]:
    """`count` packed batches collated for `isolation` by finetune's collator, moved to the
    device; the counts the trainer takes from the host batch are kept beside them. The
    collator builds a mask (4D or flex) on the run's device, where it is used, as the trainer
    does; only the token ids cross from the host."""
    from finetune.data.collate import Collator
    from finetune.metrics.flops import document_lengths
    from finetune.train.loss import trained_tokens

    collate = Collator(pad_id=0, isolation=isolation, mask_dtype=ctx.dtype, device=ctx.device)
    out = []
    for seed in range(count):
        host = collate(packed_rows(ctx, seed))
        out.append(StepBatch(to_device(host, ctx.device), trained_tokens(host),
                             int(host["input_ids"].numel()), document_lengths(host)))
    return out


def step_model(ctx: Context, attn: str, lora_kernel: str, *, layers: int | None = None,
               dropout: float = 0.0) -> Any:
    """The Llama-3-8B-shaped model with LoRA r=16 on every linear layer, seeded: every call
    gives the same weights. `layers` overrides the step's layer count (the resume and fsdp2
    sections need fewer); `dropout` is the adapters' dropout (it draws from the RNG)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.kernels import apply_lora_kernel

    hidden, intermediate, step_layers, heads, kv_heads, vocab = ctx.sizes.step_model
    layers = layers or step_layers
    register_attention(attn)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=ctx.dtype)
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                 lora_dropout=dropout,
                                                 target_modules="all-linear"))
    apply_lora_kernel(model, lora_kernel)
    model.train()
    return model


def step_optimizer(ctx: Context, model: Any, params: list[Any] | None = None) -> Any:
    """The plan's optimizer over the adapters (or over `params`)."""
    from finetune.kernels import build_optimizer

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return build_optimizer(ctx.packed_plan.choice("optimizer"), params, lr=1e-3, betas=(0.9, 0.999),
                           eps=1e-8, weight_decay=0.0)


def optimizer_step(model: Any, optimizer: Any, step: StepBatch) -> tuple[float, float]:
    """One optimizer step as finetune's trainer takes it (finetune.train.trainer): the loss
    through `accumulate_gradients` and `causal_lm_loss`, gradient clipping, the optimizer step,
    then the loss and the gradient norm read in one host sync. Returns (loss, grad norm)."""
    import torch

    from finetune.train.loss import accumulate_gradients, causal_lm_loss

    window = accumulate_gradients(model, [step.batch], causal_lm_loss, window_tokens=step.trained,
                                  backward=lambda loss: loss.backward())
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, norm = torch.stack([window.loss_sum.float() / step.trained, grad_norm.float()]).tolist()
    return loss, norm


def timed_run(ctx: Context, attn: str, isolation: str | None, lora_kernel: str) -> dict[str, Any]:
    """One warm-up step, then `step_steps` timed ones; figures of the timed steps."""
    import torch

    from finetune.metrics.flops import TrainingMode, step_flops

    steps = ctx.sizes.step_steps
    batches = step_batches(ctx, isolation, steps + 1)
    model = step_model(ctx, attn, lora_kernel)
    optimizer = step_optimizer(ctx, model)
    reset_peak(ctx)
    optimizer_step(model, optimizer, batches[0])  # compiles, autotunes, allocates
    times, losses = [], []
    for step in batches[1:]:
        sync(ctx)
        start = time.perf_counter()
        loss, _ = optimizer_step(model, optimizer, step)  # reads the loss: ends with a sync
        times.append(time.perf_counter() - start)
        losses.append(loss)
    median = statistics.median(times)
    flops = step_flops(model.config, TrainingMode.of(model), batches[1].doc_lengths)
    peak = ctx.profile.peak_bf16_tflops if ctx.dtype == torch.bfloat16 else None
    result = {"attn_implementation": attn, "isolation": isolation, "lora": lora_kernel,
              "step_s": round(median, 4), "tokens_per_s": round(batches[1].tokens / median, 1),
              "mfu": round(flops / median / (peak * 1e12), 4) if flops and peak else None,
              "peak_gib": peak_gib(ctx), "first_loss": round(losses[0], 5),
              "last_loss": round(losses[-1], 5)}
    del model, optimizer
    return result


def section_step(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    hidden, intermediate, layers, heads, kv_heads, vocab = ctx.sizes.step_model
    out["model"] = {"hidden": hidden, "intermediate": intermediate, "layers": layers,
                    "llama3_8b_layers": LLAMA3_8B_LAYERS, "heads": heads, "kv_heads": kv_heads,
                    "vocab": vocab, "dtype": str(ctx.dtype), "lora_rank": LORA_RANK,
                    "lora_targets": "all-linear"}
    out["batch"] = {"rows": ctx.sizes.step_rows, "seq": ctx.sizes.step_seq,
                    "docs_per_row": ctx.sizes.step_docs, "timed_steps": ctx.sizes.step_steps}
    head_dim = hidden // heads
    out["unsupported"] = unsupported(ctx, packing=True, head_dim=head_dim)
    planned = packed_candidate(ctx)
    lora = ctx.packed_plan.choice("lora")
    runs = out.setdefault("runs", {})
    packing = {name: c for name, c in candidates(ctx, packing=True, head_dim=head_dim).items()
               if c.packing_isolation is not None and (name != "eager" or name == planned.name)}
    if planned.name in packing:  # the plan's choice first: it is what a run gets
        packing = {planned.name: packing.pop(planned.name), **packing}
    for name, candidate in packing.items():
        runs[name] = timed_run(ctx, use_attention(ctx, candidate), candidate.packing_isolation,
                               lora)
    if lora != "peft" and planned.name in packing:
        runs[f"{planned.name}+lora=peft"] = timed_run(
            ctx, use_attention(ctx, planned), planned.packing_isolation, "peft")
    use_attention(ctx, planned)
    finals = [r["last_loss"] for r in runs.values()]
    if not finals:
        raise Skip("no attention that keeps packed documents apart is supported here")
    tolerance = 2e-2 if ctx.dtype != torch.float32 else 1e-3
    spread = max(finals) - min(finals)
    out["loss_spread"] = round(spread, 5)
    out["losses_agree"] = spread <= tolerance * max(abs(x) for x in finals)
    if not out["losses_agree"]:
        raise RuntimeError(f"the losses after {ctx.sizes.step_steps} steps differ by {spread:.4g} "
                           f"across attentions: {dict(zip(runs, finals, strict=True))}")
