"""op_profile: one profiled optimizer step of the step section's model (the plan's attention and
LoRA kernel): each kind of op's share of the step's time, the largest first, as
`scripts/bench_layout.py --profile` gives on CPU. On a GPU the shares are of device time (the
kernels' self time); on CPU of the calling thread's time, with what ran outside aten ops."""

from __future__ import annotations

import time
from typing import Any

from .context import Context, packed_candidate, sync, use_attention
from .runner import Skip
from .step import optimizer_step, step_batches, step_model, step_optimizer

TOP = 15
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_addmm_activation")


# Kernel names: cuBLAS/cuBLASLt (gemm, nvjet, cutlass), hipBLASLt/rocBLAS (Cijk_), attention
# kernels (FlashAttention, cuDNN's sdpa, the efficient kernel's fmha, Triton's flex).
MATMUL_KERNELS = ("gemm", "nvjet", "cutlass", "cublas", "cijk_", "matmul")
ATTENTION_KERNELS = ("scaled_dot_product", "flash", "attention", "fmha", "sdpa", "flex")


def op_kind(name: str) -> str:
    """The group an op's (or a device kernel's) time is counted under."""
    lowered = name.lower()
    if name in MATMULS or any(k in lowered for k in MATMUL_KERNELS):
        return "matrix products"
    if any(k in lowered for k in ATTENTION_KERNELS):
        return "attention"
    return name if len(name) <= 80 else name[:77] + "..."


def _device_us(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def _is_kernel(event: Any) -> bool:
    return "CPU" not in str(getattr(event, "device_type", "CPU"))


def op_shares(events: Any, total_us: float, device: bool) -> dict[str, float]:
    """Share (%) of `total_us` per op kind from a profiler's key_averages(), largest first."""
    shares: dict[str, float] = {}
    for event in events:
        if device:  # kernels only: an aten op's device time is its kernels' time again
            if not _is_kernel(event):
                continue
            self_us = _device_us(event)
        else:
            if not event.key.startswith("aten::"):
                continue
            self_us = event.self_cpu_time_total
        if self_us:
            kind = op_kind(event.key)
            shares[kind] = shares.get(kind, 0.0) + 100 * self_us / total_us
    if not device:
        shares["outside aten ops"] = max(0.0, 100 - sum(shares.values()))
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    return {name: round(share, 2) for name, share in ranked[:TOP]}


def section_op_profile(ctx: Context, out: dict[str, Any]) -> None:
    from torch.profiler import ProfilerActivity, profile

    planned = packed_candidate(ctx)
    if planned.packing_isolation is None:
        raise Skip(f"the plan's attention ({planned.name}) does not pack")
    model = step_model(ctx, use_attention(ctx, planned), ctx.packed_plan.choice("lora"))
    optimizer = step_optimizer(ctx, model)
    warm, measured = step_batches(ctx, planned.packing_isolation, 2)
    optimizer_step(model, optimizer, warm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.gpu else [])
    sync(ctx)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        optimizer_step(model, optimizer, measured)
        sync(ctx)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    out.update(attention=planned.name, lora=ctx.packed_plan.choice("lora"),
               step_s=round(wall_us / 1e6, 4), time="device" if ctx.gpu else "host")
    if ctx.gpu:
        device_us = sum(_device_us(e) for e in events if _is_kernel(e))
        out["device_busy_fraction"] = round(device_us / wall_us, 3) if wall_us else None
        out["shares_pct"] = op_shares(events, device_us or wall_us, device=True)
    else:
        out["shares_pct"] = op_shares(events, wall_us, device=False)
