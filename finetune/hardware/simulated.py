"""Named simulated profiles: what `detect()` would return on common machines.

They are built through the same builders as real detection (from injected device properties),
so `finetune env --profile h100` shows the plan an H100 would get. Memory figures are what
torch reports (GiB per device, per GCD on MI250X); device counts are typical nodes. Simulated
profiles carry fixed torch, transformers and (NVIDIA) cuDNN versions so the plan table does not
depend on what is installed here. A GPU profile also has what a GPU build of torch brings with
it: Triton (GPU_TORCH_PACKAGES) and, from torch 2.10, torch's in-tree varlen attention (the
planner reads that from the torch version); only the packages that need an install of their own
(SEPARATE_PACKAGES: flash-attn, liger-kernel, bitsandbytes, deepspeed) are assumed or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from finetune.hardware.detect import (
    GIB,
    profile_from_cpu,
    profile_from_device_properties,
    profile_from_mps,
    profile_from_xpu_properties,
)
from finetune.hardware.profile import (
    GPU_TORCH_PACKAGES,
    OPTIONAL_PACKAGES,
    DeviceProperties,
    HardwareProfile,
)

SIMULATED_TORCH_VERSION = "2.10.0"
SIMULATED_TRANSFORMERS_VERSION = "5.0.0"
SIMULATED_CUDNN_VERSION = "9.10.2"
ASSUME_PACKAGES = ("none", "all")


def _nvidia(name: str, cc: tuple[int, int], sms: int, gib: float, *, count: int = 8,
            machine: str = "x86_64", integrated: bool = False) -> Callable[..., HardwareProfile]:
    props = DeviceProperties(
        is_hip=False, name=name, gcn_arch_name=name,  # CUDA builds alias gcnArchName to name
        major=cc[0], minor=cc[1], total_memory=int(gib * GIB), multi_processor_count=sms,
        is_integrated=integrated, machine=machine,
    )
    return lambda **kw: profile_from_device_properties(
        props, device_count=count, runtime_version="12.8", torch_version=SIMULATED_TORCH_VERSION,
        cudnn=SIMULATED_CUDNN_VERSION, **kw,
    )


def _amd(name: str, gcn: str, cc: tuple[int, int], cus: int, gib: float, *, count: int = 8,
         integrated: bool = False, rocm: str = "6.4") -> Callable[..., HardwareProfile]:
    props = DeviceProperties(
        is_hip=True, name=name, gcn_arch_name=gcn, major=cc[0], minor=cc[1],
        total_memory=int(gib * GIB), multi_processor_count=cus, is_integrated=integrated,
        machine="x86_64",
    )
    return lambda **kw: profile_from_device_properties(
        props, device_count=count, runtime_version=rocm, torch_version=SIMULATED_TORCH_VERSION,
        **kw,
    )


_BUILDERS: dict[str, Callable[..., HardwareProfile]] = {
    "cpu": lambda **kw: profile_from_cpu(
        name="x86-64 CPU (AVX2, no native bf16)", host_memory_bytes=64 * GIB, cpu_bf16=False,
        torch_version=SIMULATED_TORCH_VERSION, **kw,
    ),
    "cpu-amx": lambda **kw: profile_from_cpu(
        name="Intel Xeon Sapphire Rapids (AMX-BF16)", host_memory_bytes=256 * GIB,
        cpu_bf16=True, cpu_amx=True, torch_version=SIMULATED_TORCH_VERSION, **kw,
    ),
    "cpu-avx512bf16": lambda **kw: profile_from_cpu(
        name="x86-64 CPU (AVX512-BF16, no AMX)", host_memory_bytes=64 * GIB, cpu_bf16=True,
        torch_version=SIMULATED_TORCH_VERSION, **kw,
    ),
    "mps": lambda **kw: profile_from_mps(
        name="Apple M2 Max (MPS)", recommended_max_memory=72 * GIB, macos="15.5",
        torch_version=SIMULATED_TORCH_VERSION, **kw,
    ),
    "xpu-max1550": lambda **kw: profile_from_xpu_properties(
        name="Intel(R) Data Center GPU Max 1550", total_memory=64 * GIB,
        max_compute_units=512, device_count=2, torch_version=SIMULATED_TORCH_VERSION, **kw,
    ),
    "t4": _nvidia("Tesla T4", (7, 5), 40, 14.6, count=1),
    "v100": _nvidia("Tesla V100-SXM2-32GB", (7, 0), 80, 31.7),
    "a100": _nvidia("NVIDIA A100-SXM4-80GB", (8, 0), 108, 79.2),
    "l40s": _nvidia("NVIDIA L40S", (8, 9), 142, 44.4),
    "rtx4090": _nvidia("NVIDIA GeForce RTX 4090", (8, 9), 128, 23.6, count=1),
    "h100": _nvidia("NVIDIA H100 80GB HBM3", (9, 0), 132, 79.1),
    "h200": _nvidia("NVIDIA H200", (9, 0), 132, 139.8),
    "gh200": _nvidia("NVIDIA GH200 480GB", (9, 0), 132, 94.5, count=1, machine="aarch64"),
    "b200": _nvidia("NVIDIA B200", (10, 0), 148, 178.4),
    "rtx5090": _nvidia("NVIDIA GeForce RTX 5090", (12, 0), 170, 31.4, count=1),
    # MI250X appears as two devices (one per GCD); ROCm reports a synthetic capability 9.0.
    "mi250x": _amd("AMD Instinct MI250X/MI250", "gfx90a:sramecc+:xnack-", (9, 0), 110, 64.0),
    "mi300x": _amd("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", (9, 4), 304, 192.0),
    "mi300a": _amd("AMD Instinct MI300A", "gfx942:sramecc+:xnack-", (9, 4), 228, 128.0,
                   count=4, integrated=True),
    "mi325x": _amd("AMD Instinct MI325X", "gfx942:sramecc+:xnack-", (9, 4), 304, 256.0),
    "mi355x": _amd("AMD Instinct MI355X", "gfx950:sramecc+:xnack-", (9, 5), 256, 288.0,
                   rocm="7.0"),
    "rx7900xtx": _amd("AMD Radeon RX 7900 XTX", "gfx1100", (11, 0), 96, 24.0, count=1),
    "rx9070": _amd("AMD Radeon RX 9070", "gfx1201", (12, 0), 56, 16.0, count=1),
}

PROFILE_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def profile_by_name(name: str, assume_packages: str = "none") -> HardwareProfile:
    """The named simulated profile.

    Args:
        name: one of PROFILE_NAMES.
        assume_packages: "none" (no package that needs an install of its own; a GPU profile
            still has what GPU builds of torch ship, GPU_TORCH_PACKAGES) or "all" (every one in
            OPTIONAL_PACKAGES is, so the plan shows the best the hardware allows).

    Raises:
        ValueError: unknown name or assume_packages value; the message lists the valid ones.
    """
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown hardware profile {name!r}; valid profiles: {', '.join(PROFILE_NAMES)}"
        )
    if assume_packages not in ASSUME_PACKAGES:
        raise ValueError(
            f"assume_packages must be one of {', '.join(ASSUME_PACKAGES)}, got {assume_packages!r}"
        )
    packages = frozenset(OPTIONAL_PACKAGES) if assume_packages == "all" else frozenset()
    profile = _BUILDERS[name](packages=packages, simulated=True, profile_name=name)
    if profile.vendor in ("nvidia", "amd", "intel"):
        profile = replace(profile, packages=profile.packages | frozenset(GPU_TORCH_PACKAGES))
    return replace(profile, transformers=SIMULATED_TRANSFORMERS_VERSION)
