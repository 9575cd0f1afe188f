"""Precision family: bf16 where it is native, else fp16 with a grad scaler (GPU), else fp32.

On a CPU, bf16 leads only with AMX-BF16 tiles. With AVX512-BF16 alone, oneDNN's bf16 matmul
(brg_matmul:avx512_core_bf16) is slower than MKL's fp32 one: on a 2-core AVX512-BF16 Xeon
without AMX, torch 2.13, `python scripts/bench_matmul.py` measured 172 GFLOP/s in bf16 and 305
in fp32 for 2048x512 @ 512x1792 (0.52-0.57x over three shapes), and a LoRA step of a
30M-parameter Llama ran at 0.62x its fp32 speed under bf16 autocast (`python scripts/bench.py
--precision bf16`). There bf16 is still offered, ranked after fp32: `kernels.precision=bf16`
halves the frozen weights' memory.

Trainable weights and optimizer state always stay fp32; `base_dtype` is the dtype of the
frozen weights, `autocast` says whether the forward runs under autocast in the chosen dtype.
TF32 for fp32 matmuls: on NVIDIA Ampere+ and MI300 (hipBLASLt); never on gfx950, which has no
TF32 hardware (hipBLASLt emulates it with bf16 and has an open wrong-result report:
ROCm/hipBLASLt#1806, ROCm/rocm-libraries#12226).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.hardware.arch import (
    AMD_BF16_NATIVE,
    AMD_HIPBLASLT_TF32,
    AMD_TF32_EMULATED,
    is_amd,
    is_nvidia_sm80_plus,
)
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support, torch_at_least

EMULATED_TF32_WHY = (
    "has no TF32 hardware; hipBLASLt emulates TF32 with bf16 and that path has an open "
    "wrong-result report (ROCm/hipBLASLt#1806, ROCm/rocm-libraries#12226)"
)
MPS_BF16_MIN_MACOS = 14
MPS_BF16_MIN_TORCH = "2.6"


def _macos_major(profile: HardwareProfile) -> int:
    try:
        return int((profile.macos or "0").split(".")[0])
    except ValueError:
        return 0


def _bf16(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor == "nvidia":
        if is_nvidia_sm80_plus(profile):
            return True, f"native bf16 on {profile.arch} (compute capability 8.0+)"
        return False, (
            f"needs compute capability 8.0+ for native bf16; {profile.arch} only emulates it "
            "(torch.cuda.is_bf16_supported() counts emulation)"
        )
    if profile.vendor == "amd":
        if is_amd(profile, AMD_BF16_NATIVE):
            return True, f"native bf16 on {profile.arch}"
        return False, f"needs AMD gfx90a or newer for native bf16; this is {profile.arch}"
    if profile.vendor == "intel":
        return True, "native bf16 on Intel XPU"
    if profile.vendor == "apple":
        if _macos_major(profile) >= MPS_BF16_MIN_MACOS and torch_at_least(
            profile, MPS_BF16_MIN_TORCH
        ):
            return True, f"bf16 on MPS (macOS {profile.macos}, torch {profile.torch})"
        return False, (
            f"needs macOS {MPS_BF16_MIN_MACOS}+ and torch {MPS_BF16_MIN_TORCH}+ on MPS; this is "
            f"macOS {profile.macos}, torch {profile.torch}"
        )
    if profile.cpu_amx:
        return True, "the CPU has AMX-BF16 (bf16 matrix tiles)"
    if profile.cpu_bf16:
        return True, (
            "the CPU has AVX512-BF16 but no AMX: bf16 halves the frozen weights' memory, but "
            "its matmuls run slower than fp32 ones here, so auto picks fp32"
        )
    return False, "needs a CPU with AMX-BF16 or AVX512-BF16 (not in /proc/cpuinfo flags)"


def _fp16(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor in ("nvidia", "amd", "intel"):
        return True, "fp16 autocast with a grad scaler"
    if profile.vendor == "apple":
        return False, "is not offered on MPS (fp16 with a grad scaler is not validated there)"
    return False, "has no fast matmul on CPUs without AMX-FP16; use bf16 where native, else fp32"


def _fp32(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if slow_cpu_bf16(profile):
        return True, (
            "full fp32: on a CPU with AVX512-BF16 but no AMX, fp32 matmuls outrun bf16 ones "
            "(1.8x measured); kernels.precision=bf16 halves the frozen weights' memory"
        )
    return True, "full fp32"


def slow_cpu_bf16(profile: HardwareProfile) -> bool:
    """A CPU whose bf16 is AVX512-BF16 without AMX: native, but slower than fp32."""
    return profile.vendor == "cpu" and profile.cpu_bf16 and not profile.cpu_amx


@dataclass(frozen=True)
class PrecisionCandidate(Candidate):
    """A precision whose rank also depends on the CPU's bf16 (`slow_cpu_bf16`)."""

    slow_cpu_rank: int | None = None

    def rank(self, profile: HardwareProfile, packing: bool = False) -> int:
        if self.slow_cpu_rank is not None and slow_cpu_bf16(profile):
            return self.slow_cpu_rank
        return super().rank(profile, packing)


PRECISION: Registry[Candidate] = Registry(
    "precision",
    [
        PrecisionCandidate("bf16", _bf16, default_rank=0, slow_cpu_rank=3),
        Candidate("fp16", _fp16, default_rank=1),
        Candidate("fp32", _fp32, default_rank=2),
    ],
)


def tf32_enabled(profile: HardwareProfile) -> bool:
    """TF32 matmuls for fp32 work: NVIDIA Ampere+, and hipBLASLt on MI300 (gfx94x)."""
    return is_nvidia_sm80_plus(profile) or is_amd(profile, AMD_HIPBLASLT_TF32)


def tf32_reason(profile: HardwareProfile) -> str:
    """Why TF32 is on or off for fp32 matmuls on this machine."""
    if is_amd(profile, AMD_TF32_EMULATED):
        return f"off: {profile.arch} {EMULATED_TF32_WHY}"
    if is_nvidia_sm80_plus(profile):
        return f"on: TF32 tensor cores on {profile.arch}"
    if is_amd(profile, AMD_HIPBLASLT_TF32):
        return f"on: hipBLASLt TF32 on {profile.arch} (HIPBLASLT_ALLOW_TF32=1)"
    return f"off: no TF32 matmuls on {profile.arch}"


def precision_details(profile: HardwareProfile, choice: str) -> dict[str, Any]:
    """The fields recorded next to the precision choice in kernel_plan.json."""
    return {
        "base_dtype": choice,
        "trainable_dtype": "fp32",
        "autocast": choice in ("bf16", "fp16"),
        "grad_scaler": choice == "fp16",
        "tf32": tf32_enabled(profile),
        "tf32_reason": tf32_reason(profile),
    }


def precision_env(profile: HardwareProfile) -> dict[str, tuple[str, str]]:
    """Environment variables the precision choice needs: name -> (value, reason)."""
    if is_amd(profile, AMD_TF32_EMULATED):
        return {"HIPBLASLT_ALLOW_TF32": ("0", f"never TF32 on {profile.arch}: it {EMULATED_TF32_WHY}")}
    if is_amd(profile, AMD_HIPBLASLT_TF32):
        return {
            "HIPBLASLT_ALLOW_TF32": (
                "1",
                f"hipBLASLt TF32 for fp32 matmuls; honoured on MI300 ({profile.arch})",
            )
        }
    return {}
