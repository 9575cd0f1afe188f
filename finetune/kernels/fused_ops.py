"""Fused-ops family: Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy).

Liger runs on CUDA, ROCm and XPU through Triton; there is no CPU or MPS backend (supported
hardware: the linkedin/Liger-Kernel README). Fused linear cross-entropy (FLCE) is off by default
on gfx950, where it measured 2.5x slower (sgl-project/SpecForge#779). This module only decides
which ops to use; `finetune.kernels.apply.apply_fused_ops` patches them into a model.
"""

from __future__ import annotations

from typing import Any

from finetune.hardware.arch import AMD_BF16_NATIVE, is_nvidia_sm80_plus
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support, torch_at_least

LIGER_OPS: tuple[str, ...] = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
# Where FLCE is slower than the unfused loss, so `auto` leaves it off.
FLCE_SLOW_ARCHS: frozenset[str] = frozenset({"gfx950"})


def liger_support(profile: HardwareProfile, facts: ModelFacts) -> Support:
    """Whether Liger's Triton kernels run on `profile` (shared by the loss-head family)."""
    if profile.vendor not in ("nvidia", "amd", "intel"):
        return False, "needs CUDA, ROCm or XPU (Liger's Triton kernels have no CPU/MPS backend)"
    if profile.vendor == "nvidia" and not is_nvidia_sm80_plus(profile):
        return False, f"needs NVIDIA sm80+ (Triton's supported range); this is {profile.arch}"
    if profile.vendor == "amd":
        if profile.arch not in AMD_BF16_NATIVE:
            return False, f"needs AMD gfx90a or newer for Triton; this is {profile.arch}"
        if not torch_at_least(profile, "2.5"):
            return False, f"needs torch 2.5+ on ROCm; this is {profile.torch}"
    missing = [p for p in ("liger-kernel", "triton") if not profile.has_package(p)]
    if missing:
        return False, f"needs {' and '.join(missing)} (pip install liger-kernel)"
    return True, f"Liger Triton kernels on {profile.arch}"


def _none(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "model's own modules (unfused)"


FUSED_OPS: Registry[Candidate] = Registry(
    "fused_ops",
    [Candidate("liger", liger_support, default_rank=0), Candidate("none", _none, default_rank=1)],
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


def fused_ops_details(profile: HardwareProfile, choice: str, flce_setting: str,
                      loss_head: str = "liger") -> dict[str, Any]:
    """The fields recorded next to the fused_ops choice: which Liger ops are patched. Liger's
    fused linear cross-entropy is among them only when the loss-head family chose it
    (`loss_head`, see finetune.kernels.loss_head)."""
    if choice != "liger":
        return {"ops": []}
    use_flce, why = flce_enabled(profile, flce_setting)
    use_flce = use_flce and loss_head == "liger"
    ops = [op for op in LIGER_OPS if use_flce or op != "fused_linear_cross_entropy"]
    return {"ops": ops, "fused_linear_cross_entropy": why}

