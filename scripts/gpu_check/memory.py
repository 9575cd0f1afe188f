"""memory: peak memory per attention implementation at 4k and 8k tokens (a silent MATH
fallback grows ~4x from 4k to 8k); gemm: a bf16 matmul in TFLOP/s against the profile's peak."""

from __future__ import annotations

import statistics
import time
from typing import Any

from .context import (
    Context,
    candidates,
    llama,
    peak_gib,
    plan_candidate,
    reset_peak,
    sync,
    unsupported,
    use_attention,
)


def section_memory(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    shape = ctx.sizes.memory_model
    head_dim = shape[0] // shape[2]
    out["unsupported"] = unsupported(ctx, head_dim=head_dim)
    for name, candidate in candidates(ctx, head_dim=head_dim).items():
        entry = out.setdefault(name, {})
        model = llama(ctx, shape, use_attention(ctx, candidate))
        for seq in ctx.sizes.memory_seqs:
            ids = torch.randint(0, shape[4], (1, seq), device=ctx.device)
            reset_peak(ctx)
            try:
                model(input_ids=ids, labels=ids).loss.backward()
                sync(ctx)
                entry[f"peak_gib_{seq}"] = peak_gib(ctx)
            except torch.cuda.OutOfMemoryError:
                entry[f"peak_gib_{seq}"] = "out of memory"
            model.zero_grad(set_to_none=True)
        peaks = [entry.get(f"peak_gib_{s}") for s in ctx.sizes.memory_seqs]
        if all(isinstance(p, float) for p in peaks) and len(peaks) == 2:
            # Fused attention grows linearly with seq; MATH (a silent fallback) quadratically.
            entry["growth_x2_seq"] = round(peaks[1] / peaks[0], 2)
        del model
    use_attention(ctx, plan_candidate(ctx))


def section_gemm(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    n = ctx.sizes.gemm
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    for _ in range(3):
        a @ b
    sync(ctx)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync(ctx)
        times.append(time.perf_counter() - start)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    peak = ctx.profile.peak_bf16_tflops
    out.update({"n": n, "dtype": str(ctx.dtype), "tflops": round(tflops, 1), "peak_tflops": peak,
                "fraction_of_peak": round(tflops / peak, 3) if peak else None})
