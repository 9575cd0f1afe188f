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
    checkpointing is left as the run set it (trainer.gradient_checkpointing). Weights still read
    in place from a memory-mapped weights file are first copied out, so the file is released
    (own_mapped_weights)."""
    from peft import prepare_model_for_kbit_training

    own_mapped_weights(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed memory mappings (Linux's
    /proc/self/maps); empty where the system does not list them."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def mapped_tensors(model: torch.nn.Module) -> list[str]:
    """The names of `model`'s parameters and buffers whose storage lies in a file mapping (a
    weights file read without a copy)."""
    ranges = _file_mappings()
    names = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        address = tensor.untyped_storage().data_ptr()
        if any(low <= address < high for low, high in ranges):
            names.append(name)
    return names


def own_mapped_weights(model: torch.nn.Module) -> int:
    """Copy every parameter and buffer that still points into a memory-mapped weights file into
    memory of its own; return the bytes copied.

    transformers reads safetensors files through a memory map and, on the CPU, keeps the
    tensors it needs not convert (embeddings, norms) as views of that map. The map then stays
    open for the life of the model, and with it every page of the file read to quantise the
    linear layers: about the model's size in full precision, resident on top of its 4-bit
    copy. Once nothing points into it, the map is closed and those pages leave the process.
    Ties (a shared embedding and output head) are kept: the parameter objects stay the same.
    """
    ranges = _file_mappings()
    if not ranges:
        return 0
    copied = 0
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for tensor in group.values():
                if tensor is None:
                    continue
                address = tensor.untyped_storage().data_ptr()
                if any(low <= address < high for low, high in ranges):
                    copied += tensor.untyped_storage().nbytes()
                    tensor.data = tensor.data.clone()
    if copied:
        logger.info("copied %.1f MiB of weights out of the memory-mapped weights file, which "
                    "is then released", copied / 2**20)
    return copied
