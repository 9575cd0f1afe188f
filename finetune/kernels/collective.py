"""Collective family: the torch.distributed backend for multi-process runs.

nccl on NVIDIA and on ROCm (where torch's nccl backend is RCCL), xccl on Intel XPU (torch 2.8+,
where it first ships), gloo on CPU and Apple. Sources: ROCm/pytorch#347 (nccl hipified to RCCL),
the torch.distributed docs (https://docs.pytorch.org/docs/stable/distributed.html, backends),
deepspeedai/DeepSpeed#7299 (xccl from torch 2.8).
"""

from __future__ import annotations

from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support, torch_at_least

XCCL_TORCH = "2.8"


def _nccl(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor == "nvidia":
        return True, "NCCL between NVIDIA GPUs"
    if profile.vendor == "amd":
        return True, "RCCL: torch's nccl backend is hipified to RCCL on ROCm"
    return False, "needs NVIDIA or AMD GPUs (NCCL/RCCL)"


def _xccl(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor != "intel":
        return False, "needs Intel XPUs (oneCCL)"
    if not torch_at_least(profile, XCCL_TORCH):
        return False, f"needs torch {XCCL_TORCH}+ (xccl ships from 2.8); this is {profile.torch}"
    return True, "oneCCL through torch's xccl backend"


def _gloo(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor in ("cpu", "apple"):
        return True, f"host-side collectives for {profile.arch}"
    if profile.vendor == "intel":
        if torch_at_least(profile, XCCL_TORCH):
            return False, "does not take XPU tensors; use xccl"
        # No XPU collective before torch 2.8: single-process runs still plan, and a
        # multi-process XPU run fails at its first collective with torch's own error.
        return True, (f"the only backend on torch {profile.torch}; it does not take XPU "
                      f"tensors, so several XPU processes need torch {XCCL_TORCH}+ (xccl)")
    return True, "works, but much slower than NCCL/RCCL between GPUs"


COLLECTIVE: Registry[Candidate] = Registry(
    "collective",
    [
        Candidate("nccl", _nccl, default_rank=0),
        Candidate("xccl", _xccl, default_rank=0),
        Candidate("gloo", _gloo, default_rank=1),
    ],
)
