"""Carry out a kernel plan on this process: environment variables, torch globals, model patches.

The planner only decides; everything here changes process state. `apply_env` must run before
the first CUDA/HIP call or self-check; `apply_fused_ops` patches a loaded model before
adapters are attached.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from finetune.kernels.fused_ops import LIGER_OPS
from finetune.kernels.kernel_plan import KernelPlan

logger = logging.getLogger(__name__)


def apply_env(plan: KernelPlan) -> dict[str, str]:
    """Put the plan's environment variables into os.environ and enable TF32 where planned.

    Call before the first CUDA/HIP call: ROCm and torch read several of these once at start.
    A variable the user already set to another value is kept (explicit beats automatic) and
    logged. Returns the variables this call set.
    """
    applied: dict[str, str] = {}
    for name, value in plan.env.items():
        current = os.environ.get(name)
        if current is not None and current != value:
            logger.warning(
                "env: keeping %s=%s from the environment (the plan would set %s)",
                name, current, value,
            )
            continue
        os.environ[name] = value
        applied[name] = value
    if plan.tf32 and plan.hardware.vendor in ("nvidia", "amd"):
        torch.set_float32_matmul_precision("high")
    return applied


def apply_fused_ops(model: torch.nn.Module, ops: Sequence[str]) -> list[str]:
    """Patch a loaded Hugging Face model with Liger's `ops` (`plan.fused_ops`); returns the
    ops applied.

    A no-op (returns []) when `ops` is empty, or when Liger has no patch for the model's
    architecture (logged as a warning). Call before adapters are attached.

    Raises:
        ValueError: an op that is not one of LIGER_OPS.
    """
    unknown = [op for op in ops if op not in LIGER_OPS]
    if unknown:
        raise ValueError(f"unknown fused op(s) {unknown}; known: {', '.join(LIGER_OPS)}")
    if not ops:
        return []
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        logger.warning(
            "fused_ops: liger has no patch for model_type %r; running unfused", model_type
        )
        return []
    _apply_liger_kernel_to_instance(
        model=model,
        rms_norm="rms_norm" in ops,
        rope="rope" in ops,
        swiglu="swiglu" in ops,
        cross_entropy=False,
        fused_linear_cross_entropy="fused_linear_cross_entropy" in ops,
    )
    logger.info("fused_ops: liger applied to %s (%s)", model_type, ", ".join(ops))
    return list(ops)
