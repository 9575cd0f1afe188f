"""What a machine is: `HardwareProfile`, and `DeviceProperties`, the raw facts torch reports.

Both are plain frozen dataclasses so a profile can be built from injected properties (tests,
simulated profiles) exactly as from a live GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# Optional packages the kernel plan cares about, by the name the profile uses -> the installed
# distributions that provide it (any one counts). They are found by distribution metadata, not
# by module: flash-attn (FA2) and flash-attn-4 both install the `flash_attn` module, and an
# install of flash-attn-4 alone makes `flash_attn` a namespace package that a module lookup
# reads as FA2 (huggingface/transformers#44559). Nothing is imported.
PACKAGE_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "flash-attn": ("flash-attn",),  # FlashAttention 2 (CUDA, ROCm CK or ROCm Triton builds)
    "flash-attn-3": ("flash-attn-3",),  # FlashAttention 3 (flash-attention/hopper)
    "flash-attn-4": ("flash-attn-4",),  # FlashAttention 4 (CuTeDSL, flash_attn.cute)
    "liger-kernel": ("liger-kernel", "liger-kernel-nightly"),
    "bitsandbytes": ("bitsandbytes",),
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"),
    "deepspeed": ("deepspeed",),
}
OPTIONAL_PACKAGES: tuple[str, ...] = tuple(PACKAGE_DISTRIBUTIONS)
# What every GPU build of torch installs with it (CUDA: pytorch-triton; ROCm: pytorch-triton-rocm;
# XPU: pytorch-triton-xpu), so a simulated GPU profile has it whatever it assumes about the
# packages that need an install of their own (SEPARATE_PACKAGES).
GPU_TORCH_PACKAGES: tuple[str, ...] = ("triton",)
SEPARATE_PACKAGES: tuple[str, ...] = tuple(
    p for p in OPTIONAL_PACKAGES if p not in GPU_TORCH_PACKAGES)
# How an installed flash-attn was built: with its compiled extension (CUDA, or the CK backend on
# ROCm), or without it for the Triton backend (FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE at build).
FLASH_ATTN_BUILDS: tuple[str, ...] = ("compiled", "triton")

VENDORS: tuple[str, ...] = ("nvidia", "amd", "intel", "apple", "cpu")


@dataclass(frozen=True)
class DeviceProperties:
    """What `torch.cuda.get_device_properties(i)` reports for one CUDA or ROCm device.

    `gcn_arch_name` is torch's `gcnArchName`. On CUDA builds torch fills it with the device
    name (an alias), so it means something only when `is_hip` is true. On ROCm `major`/`minor`
    are synthetic (MI250 says 9.0) and must never be compared with NVIDIA capabilities.
    `machine` is `platform.machine()` of the host (GH200/GB200 are aarch64 superchips).
    """

    is_hip: bool
    name: str
    gcn_arch_name: str
    major: int
    minor: int
    total_memory: int  # bytes
    multi_processor_count: int  # SMs on NVIDIA, CUs on AMD
    is_integrated: bool
    machine: str


@dataclass(frozen=True)
class HardwareProfile:
    """The accelerator a run sees, as the kernel planner needs it.

    Fields:
        vendor: nvidia | amd | intel | apple | cpu.
        arch: sm_XY on NVIDIA, gfxNNN on AMD, xpu, mps or cpu.
        memory_gb: GiB (2**30 bytes) per device; per GCD on MI250X; host RAM on CPU.
        unified_memory: the accelerator shares memory with the host (APU, superchip, Apple).
        peak_bf16_tflops: dense bf16 peak per device from `finetune.hardware.peak`; None when
            the device is not in that table (never a guess).
        runtime: "cuda 12.8", "rocm 6.4", "xpu", "mps" or "cpu".
        torch: torch version without the local build tag.
        compute_capability: (major, minor) on NVIDIA only; None elsewhere.
        compute_units: SMs (NVIDIA), CUs (AMD), Xe vector engines (Intel); None otherwise.
        cpu_bf16: the host CPU has native bf16 (AMX-BF16 or AVX512-BF16).
        cpu_amx: the host CPU has AMX-BF16 tiles (Sapphire Rapids and later Xeons), the only
            CPU bf16 whose matmuls outrun fp32 ones (see finetune.kernels.precision).
        macos: macOS version on Apple machines, else None.
        cudnn: cuDNN version on NVIDIA when known ("9.10.2"), else None.
        packages: optional kernel packages installed here (see OPTIONAL_PACKAGES).
        flash_attn_build: how the installed flash-attn was built (FLASH_ATTN_BUILDS), None when
            it is not installed or its files do not say.
        transformers: the installed transformers version, when known (it decides which
            `attn_implementation` names are accepted).
        simulated: built from a named or injected profile, not from this machine's devices;
            kernels are then never self-checked.
        profile_name: the named simulated profile this came from, if any.
    """

    vendor: str
    arch: str
    name: str
    device_count: int
    memory_gb: float | None
    unified_memory: bool
    peak_bf16_tflops: float | None
    runtime: str
    torch: str
    compute_capability: tuple[int, int] | None = None
    compute_units: int | None = None
    cpu_bf16: bool = False
    cpu_amx: bool = False
    machine: str = "x86_64"
    macos: str | None = None
    cudnn: str | None = None
    packages: frozenset[str] = field(default_factory=frozenset)
    flash_attn_build: str | None = None
    transformers: str | None = None
    simulated: bool = False
    profile_name: str | None = None

    def has_package(self, name: str) -> bool:
        """True when the optional package `name` (one of OPTIONAL_PACKAGES) is installed."""
        return name in self.packages

    def with_packages(self, packages: frozenset[str] | set[str]) -> HardwareProfile:
        """A copy that pretends exactly `packages` are installed.

        Pretending packages are there makes the profile hypothetical, so it is marked simulated
        and will not be self-checked.
        """
        unknown = set(packages) - set(OPTIONAL_PACKAGES)
        if unknown:
            raise ValueError(
                f"unknown optional packages {sorted(unknown)}; known: {', '.join(OPTIONAL_PACKAGES)}"
            )
        if frozenset(packages) == self.packages:
            return self
        return replace(self, packages=frozenset(packages), simulated=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: the `hardware` block of kernel_plan.json."""
        cc = self.compute_capability
        return {
            "vendor": self.vendor,
            "arch": self.arch,
            "name": self.name,
            "device_count": self.device_count,
            "memory_gb": self.memory_gb,
            "unified_memory": self.unified_memory,
            "peak_bf16_tflops": self.peak_bf16_tflops,
            "runtime": self.runtime,
            "torch": self.torch,
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc is not None else None,
            "compute_units": self.compute_units,
            "cpu_bf16": self.cpu_bf16,
            "cpu_amx": self.cpu_amx,
            "machine": self.machine,
            "macos": self.macos,
            "cudnn": self.cudnn,
            "packages": sorted(self.packages),
            "flash_attn_build": self.flash_attn_build,
            "transformers": self.transformers,
            "simulated": self.simulated,
            "profile": self.profile_name,
        }
