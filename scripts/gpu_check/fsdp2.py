"""fsdp2: finetune's FSDP2 engine on one GPU (a one-rank process group: NCCL on NVIDIA, RCCL on
AMD, gloo on CPU) trains the step section's model, with fewer layers, for a few steps; its
losses must equal those of the same steps without sharding, within the rounding that FSDP2's
mixed-precision policy adds (the adapters' products in the compute dtype). This is the path a
multi-GPU fsdp2 run takes, minus the communication: the units, the mixed-precision policy,
the gradient clipping over DTensors and the optimizer over sharded adapters.
"""

from __future__ import annotations

from typing import Any

from .context import Context, packed_candidate, peak_gib, reset_peak, use_attention
from .runner import Skip
from .step import StepBatch, optimizer_step, step_batches, step_model, step_optimizer

STEPS = 3


def _sharded_step(engine: Any, accelerator: Any, model: Any, optimizer: Any,
                  step: StepBatch) -> float:
    """One optimizer step as the Trainer takes it under fsdp2; returns the loss."""
    from finetune.train.loss import accumulate_gradients, causal_lm_loss

    window = accumulate_gradients(model, [step.batch], causal_lm_loss, window_tokens=step.trained,
                                  backward=lambda loss: engine.backward(accelerator, model, loss))
    params = [p for p in model.parameters() if p.requires_grad]
    engine.clip_grad_norm(accelerator, params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (window.loss_sum.float() / step.trained).item()


def section_fsdp2(ctx: Context, out: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from finetune.distributed.engine import FullyShard
    from finetune.errors import ConfigError

    if not dist.is_available():
        raise Skip("this torch build has no torch.distributed")
    planned = packed_candidate(ctx)
    if planned.packing_isolation is None:
        raise Skip(f"the plan's attention ({planned.name}) does not pack")
    attn, lora = use_attention(ctx, planned), ctx.packed_plan.choice("lora")
    layers = ctx.sizes.small_step_layers
    batches = step_batches(ctx, planned.packing_isolation, STEPS)
    out.update(attention=planned.name, lora=lora, layers=layers, steps=STEPS)
    model = step_model(ctx, attn, lora, layers=layers)
    optimizer = step_optimizer(ctx, model)
    out["losses_unsharded"] = [optimizer_step(model, optimizer, s)[0] for s in batches]
    del model, optimizer
    compute_dtype = ctx.dtype if ctx.gpu else None  # the plan's mixed precision on a GPU
    accelerator = Accelerator(mixed_precision="bf16" if compute_dtype == torch.bfloat16 else "no")
    engine = FullyShard(param_dtype=compute_dtype)
    had_group = dist.is_initialized()
    try:
        model = step_model(ctx, attn, lora, layers=layers)
        reset_peak(ctx)
        try:
            model, optimizer = engine.prepare(accelerator, model,
                                              lambda params: step_optimizer(ctx, None, params))
        except ConfigError as refused:  # torch too old for a bf16 base with fp32 adapters
            raise Skip(f"finetune refuses fsdp2 here: {refused}") from None
        out["backend"] = dist.get_backend()
        out["world_size"] = dist.get_world_size()
        out["losses"] = [_sharded_step(engine, accelerator, model, optimizer, s)
                         for s in batches]
        out["peak_gib"] = peak_gib(ctx)
    finally:
        if not had_group and dist.is_initialized():
            dist.destroy_process_group()
    reference, sharded = out["losses_unsharded"], out["losses"]
    tolerance = 2e-2 if ctx.dtype != torch.float32 else 1e-4
    out["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(sharded, reference, strict=True))
    out["losses_agree"] = out["max_rel_diff"] <= tolerance
    if not out["losses_agree"]:
        raise RuntimeError(f"fsdp2 losses {sharded} differ from the unsharded run's {reference} "
                           f"beyond {tolerance:g} relative")
