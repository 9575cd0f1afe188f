"""adamw: fused vs foreach AdamW (fp32, bf16 autocast, fp16 + GradScaler); tf32: the TF32
state after the plan's environment is applied, against the plan."""

from __future__ import annotations

import os
from typing import Any

from .context import Context


def _adamw_run(ctx: Context, fused: bool, dtype: Any, scaler: bool) -> list[Any]:
    """Parameters after N AdamW steps on matmul losses (autocast in `dtype`; with a grad
    scaler, one step overflows on purpose and must be skipped alike)."""
    import torch

    torch.manual_seed(0)
    side = int((ctx.sizes.adamw_numel // 4) ** 0.5)
    params = [torch.nn.Parameter(torch.randn(side, side, device=ctx.device) * 0.02)
              for _ in range(4)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused,
                                  foreach=not fused)
    grad_scaler = torch.amp.GradScaler(ctx.device) if scaler else None
    gen = torch.Generator().manual_seed(1)
    for step in range(ctx.sizes.adamw_steps):
        x = torch.randn(16, side, generator=gen).to(ctx.device)
        with torch.autocast(ctx.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum((x @ p).float().pow(2).mean() for p in params)
        if scaler and step == 1:
            loss = loss * float("inf")
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().float() for p in params]


def section_adamw(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    cases = [("fp32", torch.float32, False), ("bf16_autocast", torch.bfloat16, False),
             ("fp16_grad_scaler", torch.float16, True)]
    for name, dtype, scaler in cases:
        fused = _adamw_run(ctx, True, dtype, scaler)
        foreach = _adamw_run(ctx, False, dtype, scaler)
        moved = max((p - q).abs().max().item() for p, q in zip(fused, foreach, strict=True))
        scale = max(p.abs().max().item() for p in foreach)
        out[name] = {"steps": ctx.sizes.adamw_steps, "max_abs_diff": moved,
                     "relative": moved / scale, "match": moved <= 1e-5 * max(scale, 1.0)}


def section_tf32(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    precision = torch.get_float32_matmul_precision()
    out.update({
        "planned": ctx.plan.tf32,
        "reason": ctx.plan.kernels["precision"].details.get("tf32_reason"),
        "float32_matmul_precision": precision,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "HIPBLASLT_ALLOW_TF32": os.environ.get("HIPBLASLT_ALLOW_TF32"),
        "consistent": (precision != "highest") == ctx.plan.tf32,
    })
