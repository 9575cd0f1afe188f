"""What a sharding strategy needs from the run and from torch; refused (ConfigError, exit 2)
when it cannot work, with the reason and what to use instead.

- QLoRA with parameter sharding (fsdp2, deepspeed_zero3): bitsandbytes keeps 4-bit weights in
  uint8 storage unless `bnb_4bit_quant_storage` equals the compute dtype, and sharding them then
  fails ("only Tensors of floating point dtype can require gradients") or trains silently to a
  loss of 0 or NaN (huggingface/accelerate#3983, huggingface/peft#1550). finetune does not set
  that storage, so the combination is refused.
- FSDP2 over a model whose parameters mix dtypes (a bf16 frozen base with fp32 adapters):
  FSDP2 before torch 2.8 asserts one original dtype for every parameter of a unit and fails at
  the first forward; torch 2.8 checks trainable parameters only (pytorch/pytorch#154103).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from finetune.errors import ConfigError
from finetune.kernels.registry import version_at_least

SHARDS_PARAMETERS = ("fsdp2", "deepspeed_zero3")
FSDP2_MIXED_DTYPES_TORCH = "2.8"


def torch_version() -> str:
    """The running torch's version without its local build tag ("2.7.1")."""
    return torch.__version__.split("+")[0]


def check_qlora_strategy(strategy: str, peft_method: str) -> None:
    """ConfigError when `peft_method` is qlora and `strategy` shards parameters."""
    if peft_method != "qlora" or strategy not in SHARDS_PARAMETERS:
        return
    raise ConfigError(
        f"peft=qlora cannot train with distributed={strategy}: {strategy} shards the base's "
        "parameters, and bitsandbytes keeps 4-bit weights in uint8 storage, which sharding "
        "breaks (\"only Tensors of floating point dtype can require gradients\", or a silent "
        "loss of 0 or NaN; huggingface/accelerate#3983, huggingface/peft#1550). Use "
        "distributed=ddp or deepspeed_zero2 (each process holds the whole 4-bit base, about a "
        "quarter of its bf16 size), or peft=lora with distributed=fsdp2.")


def check_fsdp2_dtypes(frozen: Iterable[torch.dtype], trainable: Iterable[torch.dtype],
                       version: str | None = None) -> None:
    """ConfigError when FSDP2 would shard parameters of several dtypes on a torch before 2.8.

    `frozen` and `trainable` are the dtypes of the model's frozen and trainable parameters;
    `version` is the torch version (the running one by default)."""
    frozen, trainable = set(frozen), set(trainable)
    version = version or torch_version()
    if len(frozen | trainable) <= 1 or version_at_least(version, FSDP2_MIXED_DTYPES_TORCH):
        return
    names = lambda dtypes: "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))  # noqa: E731
    raise ConfigError(
        f"distributed=fsdp2 with a {names(frozen) or 'frozen'} base and "
        f"{names(trainable) or 'no'} trainable weights needs torch "
        f"{FSDP2_MIXED_DTYPES_TORCH}+: FSDP2 before it asserts one dtype for every parameter of "
        f"a unit and fails at the first forward (pytorch/pytorch#154103); this is torch "
        f"{version}. Upgrade torch (pip install 'torch>={FSDP2_MIXED_DTYPES_TORCH}'), or use "
        "distributed=ddp or deepspeed_zero2/zero3.")


def check_model_for_sharding(strategy: str, model: torch.nn.Module) -> None:
    """The checks above on a loaded model, before `strategy` wraps it."""
    quantized = bool(getattr(model, "is_loaded_in_4bit", False)
                     or getattr(model, "is_loaded_in_8bit", False))
    if quantized:
        check_qlora_strategy(strategy, "qlora")
    if strategy == "fsdp2":
        params = list(model.parameters())
        check_fsdp2_dtypes((p.dtype for p in params if not p.requires_grad),
                           (p.dtype for p in params if p.requires_grad))
