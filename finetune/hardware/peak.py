"""Dense bf16 peak TFLOP/s per device, for MFU. No API reports it, so it comes from a table.

Sources:
  [tt]  pytorch/torchtitan torchtitan/tools/utils.py `get_peak_flops` (dense figures).
  [dt]  derived peak tables that extend torchtitan's (GB200, MI355X, MI300A).
  [ds]  vendor data sheets, dense (half the "with sparsity" figure): NVIDIA H200 Tensor Core GPU
        (H200 NVL 1,671 sparse -> 835; H200 SXM 1,979 -> 989), NVIDIA GH200 Grace Hopper
        Superchip (1,979 sparse -> 989).
A device that matches no row gets None: MFU is then reported as unknown instead of being
computed against a guessed peak (torchtitan falls back to the A100 figure; we do not).
Adding a row needs a cited source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PeakRow:
    """One table row. A device matches when every given criterion matches.

    `name_tokens` must all appear among the device name's alphanumeric tokens (case-insensitive),
    so "H200" does not match "GH200" and "B200" does not match "GB200".
    """

    vendor: str
    tflops: float
    source: str
    name_tokens: tuple[str, ...] = ()
    arch: str | None = None
    compute_units: int | None = None


# First match wins: more specific rows come first.
PEAK_BF16_TABLE: tuple[PeakRow, ...] = (
    PeakRow("nvidia", 312.0, "tt", name_tokens=("A100",)),
    PeakRow("nvidia", 835.0, "tt", name_tokens=("H100", "NVL")),
    PeakRow("nvidia", 756.0, "tt", name_tokens=("H100", "PCIE")),
    PeakRow("nvidia", 989.0, "tt", name_tokens=("H100",)),  # SXM and other variants
    # H200 NVL (PCIe card, 600 W) and H200 SXM report the same memory, so the name's "NVL"
    # token is what tells them apart ("NVIDIA H200 NVL" vs "NVIDIA H200").
    PeakRow("nvidia", 835.0, "ds", name_tokens=("H200", "NVL")),
    PeakRow("nvidia", 989.0, "tt", name_tokens=("H200",)),
    PeakRow("nvidia", 989.0, "ds", name_tokens=("GH200",)),
    PeakRow("nvidia", 2500.0, "dt", name_tokens=("GB200",)),
    PeakRow("nvidia", 2250.0, "tt", name_tokens=("B200",)),
    PeakRow("nvidia", 362.0, "tt", name_tokens=("L40S",)),
    PeakRow("amd", 2500.0, "dt", name_tokens=("MI355X",)),
    # MI300X and MI325X (304 CUs) vs MI300A (228 CUs) share gfx942; the CU count separates them
    # even when the marketing name is missing.
    PeakRow("amd", 1300.0, "tt", arch="gfx942", compute_units=304),
    PeakRow("amd", 980.6, "dt", arch="gfx942", compute_units=228),
    # ROCm names MI250 and MI250X alike ("AMD Instinct MI250X/MI250"); the X has 110 CUs per
    # GCD (MI250: 104). One device is one GCD, so the figure is per GCD.
    PeakRow("amd", 191.5, "tt", arch="gfx90a", compute_units=110),
)

# Intel Data Center GPU Max 1550 (PVC): 512 bf16 ops per compute unit per clock at 1.3 GHz [tt].
_PVC_OPS_PER_CU_PER_CLOCK = 512
_PVC_CLOCK_HZ = 1.3e9


def _tokens(name: str) -> set[str]:
    return {t.upper() for t in re.split(r"[^0-9A-Za-z]+", name) if t}


def peak_bf16_tflops(
    vendor: str, arch: str, name: str, compute_units: int | None
) -> float | None:
    """Dense bf16 TFLOP/s of one device, or None when the device is not in the table."""
    tokens = _tokens(name)
    if vendor == "intel" and {"MAX", "1550"} <= tokens and compute_units:
        return round(_PVC_OPS_PER_CU_PER_CLOCK * compute_units * _PVC_CLOCK_HZ / 1e12, 1)
    for row in PEAK_BF16_TABLE:
        if row.vendor != vendor:
            continue
        if row.name_tokens and not set(row.name_tokens) <= tokens:
            continue
        if row.arch is not None and row.arch != arch:
            continue
        if row.compute_units is not None and row.compute_units != compute_units:
            continue
        return row.tflops
    return None
