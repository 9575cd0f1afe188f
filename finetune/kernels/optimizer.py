"""Optimizer family: torch AdamW fused / foreach / plain loop, and bitsandbytes 8-bit AdamW.

The default is full-precision AdamW with the fastest implementation the device has; 8-bit
state is only used when asked for by name. `build_optimizer` constructs exactly what the plan
chose (fused=True, foreach=True, or neither; bitsandbytes classes).
Sources: fused AdamW on CPU pytorch/pytorch#123074, on MPS pytorch/pytorch#127242, on XPU
intel/torch-xpu-ops#879; bitsandbytes-foundation/bitsandbytes installation docs (8-bit backends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support, torch_at_least

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
OptimizerBuilder = Callable[..., torch.optim.Optimizer]

# bitsandbytes 8-bit optimizers on ROCm: CDNA gfx908/90a/942/950/1250 and RDNA gfx103x-gfx120x.
_BNB_AMD_ARCHS = frozenset({"gfx908", "gfx90a", "gfx942", "gfx950", "gfx1250"})
_BNB_AMD_PREFIXES = ("gfx103", "gfx110", "gfx115", "gfx120")
_GPU_VENDORS = ("nvidia", "amd", "intel")


@dataclass(frozen=True)
class OptimizerCandidate(Candidate):
    """An optimizer implementation; `build(params, lr=, betas=, eps=, weight_decay=)`."""

    build: OptimizerBuilder | None = None


def _fused(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor in ("nvidia", "amd"):
        return True, "torch AdamW(fused=True), one kernel for all parameters"
    if profile.vendor == "intel":
        if torch_at_least(profile, "2.6"):
            return True, "torch AdamW(fused=True) on XPU"
        return False, f"needs torch 2.6+ on XPU (fused XPU kernels); this is {profile.torch}"
    if not torch_at_least(profile, "2.4"):
        return False, f"needs torch 2.4+ on {profile.arch}; this is {profile.torch}"
    if profile.vendor == "apple":
        # Trainable weights and optimizer state are fp32, which fused MPS AdamW has supported
        # since 2.4; bf16 state would need torch 2.6+ and macOS 14.
        return True, "torch AdamW(fused=True) on MPS with fp32 state"
    return True, "torch AdamW(fused=True) on CPU"


def _foreach(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor in _GPU_VENDORS:
        return True, "torch AdamW(foreach=True), multi-tensor kernels"
    if profile.vendor == "apple":
        return False, "has no multi-tensor kernels on MPS; use adamw_fused or adamw"
    return True, "torch AdamW(foreach=True); on CPU it runs a per-tensor fallback"


def _plain(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "torch AdamW per-parameter loop (foreach=False, fused=False)"


def _bnb_backend(profile: HardwareProfile, *, paged: bool) -> Support:
    if not profile.has_package("bitsandbytes"):
        return False, "needs the bitsandbytes package (pip install bitsandbytes)"
    if profile.vendor == "nvidia":
        cc = profile.compute_capability or (0, 0)
        if cc < (6, 0):
            return False, f"needs NVIDIA sm60+ for bitsandbytes; this is {profile.arch}"
    elif profile.vendor == "amd":
        if profile.arch not in _BNB_AMD_ARCHS and not profile.arch.startswith(_BNB_AMD_PREFIXES):
            return False, f"bitsandbytes has no ROCm kernels for {profile.arch}"
    elif profile.vendor == "apple":
        return False, "bitsandbytes has no MPS backend"
    elif paged:
        return False, "pages optimizer state through GPU managed memory; on CPU use adamw_8bit"
    kind = "paged 8-bit" if paged else "8-bit"
    return True, f"bitsandbytes {kind} AdamW on {profile.arch}"


def _adamw_8bit(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return _bnb_backend(profile, paged=False)


def _paged_adamw_8bit(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return _bnb_backend(profile, paged=True)


def _torch_adamw(fused: bool, foreach: bool) -> OptimizerBuilder:
    def build(params: Params, **hparams: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, fused=fused, foreach=foreach, **hparams)

    return build


def _bnb_adamw(class_name: str) -> OptimizerBuilder:
    def build(params: Params, **hparams: Any) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)(params, **hparams)

    return build


_EIGHT_BIT = "8-bit optimizer state changes the numerics; opt in with kernels.optimizer="

OPTIMIZER: Registry[OptimizerCandidate] = Registry(
    "optimizer",
    [
        OptimizerCandidate("adamw_fused", _fused, default_rank=0,
                           build=_torch_adamw(fused=True, foreach=False)),
        OptimizerCandidate("adamw_foreach", _foreach, ranks={"cpu": 2}, default_rank=1,
                           build=_torch_adamw(fused=False, foreach=True)),
        OptimizerCandidate("adamw", _plain, ranks={"cpu": 1, "apple": 1}, default_rank=2,
                           build=_torch_adamw(fused=False, foreach=False)),
        OptimizerCandidate("adamw_8bit", _adamw_8bit, default_rank=10, auto=False,
                           not_auto_reason=_EIGHT_BIT + "adamw_8bit",
                           build=_bnb_adamw("AdamW8bit")),
        OptimizerCandidate("paged_adamw_8bit", _paged_adamw_8bit, default_rank=11, auto=False,
                           not_auto_reason=_EIGHT_BIT + "paged_adamw_8bit",
                           build=_bnb_adamw("PagedAdamW8bit")),
    ],
)


def build_optimizer(
    choice: str,
    params: Params,
    lr: float,
    betas: tuple[float, float] | list[float],
    eps: float,
    weight_decay: float,
    registry: Registry[OptimizerCandidate] | None = None,
) -> torch.optim.Optimizer:
    """Construct the optimizer the plan chose (`plan.choice("optimizer")`).

    Raises:
        KeyError: `choice` is not a known optimizer.
        ImportError: a bitsandbytes choice without bitsandbytes installed.
    """
    candidate = (registry or OPTIMIZER).get(choice)
    if candidate.build is None:
        raise ValueError(f"optimizer candidate {choice!r} has no builder")
    b1, b2 = betas
    return candidate.build(
        params, lr=lr, betas=(float(b1), float(b2)), eps=eps, weight_decay=weight_decay
    )
