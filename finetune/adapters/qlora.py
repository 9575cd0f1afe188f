"""QLoRA (peft=qlora): LoRA on a base model loaded in 4-bit NF4 with bitsandbytes.

The base's linear layers are quantised to NF4 with double quantisation (the quantisation
constants are quantised too) and compute in the kernel plan's dtype; embeddings, norms and the
output head stay in the base dtype. Dettmers et al., 2023, arXiv:2305.14314.

Where it runs is decided by `qlora_support(profile)` from bitsandbytes' own support table (the
"Accelerator support" table of bitsandbytes-foundation/bitsandbytes README, 0.50): NVIDIA sm60+,
AMD ROCm CDNA gfx908/gfx90a/gfx942/gfx950/gfx1250 and RDNA gfx101x/gfx103x/gfx110x/gfx115x/
gfx120x, Intel XPU (Data Center GPU Max, Arc A and B series), and the CPU (x86-64 with AVX2,
aarch64). Apple MPS is refused: transformers' bitsandbytes loader places 4-bit weights on CUDA,
XPU or CPU only. Anywhere else, or without the package, the run is refused before any work
with the reason, the extra to install and the alternatives.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from finetune.errors import ConfigError
from finetune.hardware.profile import HardwareProfile

logger = logging.getLogger(__name__)

QLORA = "qlora"
INSTALL = "pip install 'finetune[qlora]' (or the cuda, rocm or xpu extra, which include it)"
ALTERNATIVES = ("use peft=lora (the base in bf16/fp16 instead of 4-bit: about 4x the weight "
                "memory), or a smaller model (e.g. model=qwen2_5_0_5b)")

_AMD_ARCHS = frozenset({"gfx908", "gfx90a", "gfx942", "gfx950", "gfx1250"})
_AMD_PREFIXES = ("gfx101", "gfx103", "gfx110", "gfx115", "gfx120")
_CPU_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})


def qlora_support(profile: HardwareProfile) -> tuple[bool, str]:
    """(ok, reason): whether 4-bit NF4 loading works on `profile`, and why (or why not)."""
    if not profile.has_package("bitsandbytes"):
        return False, f"needs the bitsandbytes package: {INSTALL}"
    vendor, arch = profile.vendor, profile.arch
    if vendor == "nvidia":
        cc = profile.compute_capability or (0, 0)
        if cc < (6, 0):
            return False, f"bitsandbytes' 4-bit kernels need NVIDIA sm60 or newer; this is {arch}"
        return True, f"bitsandbytes NF4 on NVIDIA {arch}"
    if vendor == "amd":
        if arch in _AMD_ARCHS or arch.startswith(_AMD_PREFIXES):
            return True, f"bitsandbytes NF4 on ROCm {arch}"
        return False, f"bitsandbytes has no ROCm 4-bit kernels for {arch}"
    if vendor == "intel":
        return True, "bitsandbytes NF4 on Intel XPU"
    if vendor == "apple":
        return False, ("transformers' bitsandbytes loader places 4-bit weights on CUDA, XPU or "
                       "CPU only, not on Apple MPS")
    if profile.machine.lower() in _CPU_MACHINES:
        return True, f"bitsandbytes NF4 on the CPU ({profile.machine}; x86-64 needs AVX2)"
    return False, f"bitsandbytes has no CPU backend for {profile.machine}"


def check_qlora(profile: HardwareProfile) -> str:
    """The reason QLoRA can run on `profile`; ConfigError with the reason and the alternatives
    when it cannot."""
    ok, reason = qlora_support(profile)
    if not ok:
        raise ConfigError(f"peft=qlora cannot run here: {reason}. Install what it needs, or "
                          f"{ALTERNATIVES}.")
    return reason


def quantization_config(compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA: NF4, double quantisation, `compute_dtype`
    (the kernel plan's compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model loaded in 4-bit (or 8-bit) by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """Make a 4-bit base ready for adapter training (peft's prepare_model_for_kbit_training:
    frozen weights, fp32 norms, embeddings and head for stable gradients). Activation
    checkpointing is left as the run set it (trainer.gradient_checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
