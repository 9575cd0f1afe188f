"""Fused-ops family: Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy).

Liger runs on CUDA, ROCm and XPU through Triton; there is no CPU or MPS backend. Fused linear
cross-entropy (FLCE) is off by default on gfx950, where it measured 2.5x slower
(sgl-project/SpecForge#779). Facts: /work/shared/reference/gpu-kernels.md section 4.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from finetune.hardware.arch import AMD_BF16_NATIVE, is_nvidia_sm80_plus
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support, torch_at_least

if TYPE_CHECKING:
    import torch

    from finetune.kernels.planner import KernelPlan

logger = logging.getLogger(__name__)

LIGER_OPS: tuple[str, ...] = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
# Where FLCE is slower than the unfused loss, so `auto` leaves it off.
FLCE_SLOW_ARCHS: frozenset[str] = frozenset({"gfx950"})
FLCE_SETTINGS: tuple[str, ...] = ("auto", "on", "off")


def _liger(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor not in ("nvidia", "amd", "intel"):
        return False, "needs CUDA, ROCm or XPU (Liger's Triton kernels have no CPU/MPS backend)"
    if profile.vendor == "nvidia" and not is_nvidia_sm80_plus(profile):
        return False, f"needs NVIDIA sm80+ (Triton's supported range); this is {profile.arch}"
    if profile.vendor == "amd":
        if profile.arch not in AMD_BF16_NATIVE:
            return False, f"needs AMD gfx90a or newer for Triton; this is {profile.arch}"
        if not torch_at_least(profile, "2.5"):
            return False, f"needs torch 2.5+ on ROCm; this is {profile.torch}"
    missing = [p for p in ("liger_kernel", "triton") if not profile.has_package(p)]
    if missing:
        return False, f"needs {' and '.join(missing)} (pip install liger-kernel)"
    return True, f"Liger Triton kernels on {profile.arch}"


def _none(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "model's own modules (unfused)"


FUSED_OPS: Registry[Candidate] = Registry(
    "fused_ops",
    [Candidate("liger", _liger, default_rank=0), Candidate("none", _none, default_rank=1)],
)


def flce_enabled(profile: HardwareProfile, setting: str) -> tuple[bool, str]:
    """Whether Liger's fused linear cross-entropy is used, and why."""
    if setting == "on":
        return True, "set by kernels.fused_linear_cross_entropy=on"
    if setting == "off":
        return False, "set by kernels.fused_linear_cross_entropy=off"
    if profile.arch in FLCE_SLOW_ARCHS:
        return False, f"off on {profile.arch}: measured 2.5x slower there (SpecForge#779)"
    return True, "fuses lm_head and the loss so full logits are never materialised"


def fused_ops_details(profile: HardwareProfile, choice: str, flce_setting: str) -> dict[str, Any]:
    """The fields recorded next to the fused_ops choice: which Liger ops are patched."""
    if choice != "liger":
        return {"ops": []}
    use_flce, why = flce_enabled(profile, flce_setting)
    ops = [op for op in LIGER_OPS if use_flce or op != "fused_linear_cross_entropy"]
    return {"ops": ops, "fused_linear_cross_entropy": why}


def apply_fused_ops(model: torch.nn.Module, plan: KernelPlan) -> list[str]:
    """Patch a loaded Hugging Face model with the plan's fused ops; returns the ops applied.

    A no-op (returns []) when the plan chose `none`, or when Liger has no patch for the
    model's architecture (logged as a warning). Call before adapters are attached.
    """
    decision = plan.kernels["fused_ops"]
    if decision.choice != "liger":
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
    ops = list(decision.details["ops"])
    _apply_liger_kernel_to_instance(
        model=model,
        rms_norm="rms_norm" in ops,
        rope="rope" in ops,
        swiglu="swiglu" in ops,
        cross_entropy=False,
        fused_linear_cross_entropy="fused_linear_cross_entropy" in ops,
    )
    logger.info("fused_ops: liger applied to %s (%s)", model_type, ", ".join(ops))
    return ops
