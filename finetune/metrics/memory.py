"""Peak memory of a run, read without waiting for the device.

On CUDA/ROCm and XPU: the most memory the caching allocator has handed out since the process
started (a host-side counter: reading it does not synchronise). On Apple MPS, whose allocator
keeps no peak: the highest driver allocation seen at the calls so far. Elsewhere (CPU): the
process's peak resident set size.
"""

from __future__ import annotations

import resource
import sys

import torch

_GIB = 2**30
_mps_peak = 0


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak memory in GiB (2^30 bytes) for `device` (see the module docstring for the source)."""
    global _mps_peak
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    if kind == "xpu" and hasattr(torch, "xpu"):
        return torch.xpu.max_memory_allocated(device) / _GIB
    if kind == "mps":
        _mps_peak = max(_mps_peak, torch.mps.driver_allocated_memory())
        return _mps_peak / _GIB
    return peak_rss_gb()


def memory_source(device: torch.device | str) -> str:
    """What `peak_memory_gb` measures on `device`, in a few words (for plots and docs)."""
    kind = torch.device(device).type
    if kind in ("cuda", "xpu"):
        return "device memory allocated"
    if kind == "mps":
        return "MPS driver allocation"
    return "process resident memory"


def peak_rss_gb() -> float:
    """The process's peak resident set size in GiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _GIB if sys.platform == "darwin" else peak / 2**20
