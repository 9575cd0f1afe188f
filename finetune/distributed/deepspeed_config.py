"""The DeepSpeed config of a run (`distributed=deepspeed_zero2|deepspeed_zero3`) and the checks
before any work.

`build_config` turns the run's settings into a DeepSpeed config (stage, micro-batch and
accumulation, gradient clipping, the plan's 16-bit mode, fp32 gradient communication, optimizer
offload) and merges `distributed.deepspeed` over it; `check_overrides` refuses entries that
would contradict the loop; `require_deepspeed` names the extra when DeepSpeed is missing. The
engine is `finetune.distributed.deepspeed.DeepSpeedZero`.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from typing import Any

from finetune.errors import ConfigError

STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}
COMMUNICATION_DTYPES = {"auto": "fp32", "fp32": "fp32", "bf16": "bf16"}

# Entries the loop or another config key owns: a value here would disagree with what the loop
# does, so it is refused with the key to set instead.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "train_batch_size": "trainer.micro_batch_size and trainer.grad_accum_steps",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "gradient_clipping": "trainer.max_grad_norm",
    "optimizer": "optim.* (the optimizer comes from the kernel plan: kernels.optimizer)",
    "scheduler": "optim.* (the schedule is the run's own)",
}


def deepspeed_available() -> bool:
    """True when the `deepspeed` package can be imported (it is not imported here: importing it
    probes the accelerator)."""
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed(strategy: str) -> None:
    """ConfigError when `strategy` is a DeepSpeed one and DeepSpeed is not installed."""
    if strategy in STAGES and not deepspeed_available():
        raise ConfigError(
            f"distributed={strategy} needs DeepSpeed, which is not installed. Install the extra: "
            "pip install 'finetune[deepspeed]', or use distributed=fsdp2 (parameters, gradients "
            "and optimizer state sharded with PyTorch alone).")


def check_settings(distributed: Any) -> None:
    """The checks a DeepSpeed strategy needs before any work (installed, overrides that agree
    with the run); nothing for the other strategies. `distributed`: the run's
    DistributedConfig."""
    strategy = str(distributed.strategy)
    if strategy not in STAGES:
        return
    require_deepspeed(strategy)
    check_overrides(strategy, distributed.deepspeed, reduce_dtype=distributed.reduce_dtype)


def _merge(base: dict, override: Mapping) -> dict:
    """`override` merged into a copy of `base`, nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return merged


def check_overrides(strategy: str, overrides: Mapping, *, reduce_dtype: str = "auto",
                    vendor: str = "cpu") -> None:
    """ConfigError for `distributed.deepspeed` entries that contradict the run: keys another
    setting owns, another ZeRO stage, a gradient norm DeepSpeed would not compute, and 16-bit
    gradient communication on AMD GPUs."""
    for key, instead in OWNED_KEYS.items():
        if key in overrides:
            raise ConfigError(f"distributed.deepspeed.{key}: set {instead} instead; the loop and "
                              "DeepSpeed must agree on it.")
    zero = overrides.get("zero_optimization") or {}
    stage = zero.get("stage", STAGES[strategy])
    if stage != STAGES[strategy]:
        raise ConfigError(
            f"distributed.deepspeed.zero_optimization.stage={stage} contradicts "
            f"distributed={strategy}: choose the stage with distributed=deepspeed_zero{stage} "
            "(stages 2 and 3 are supported) and remove the entry.")
    if zero.get("compute_grad_norm") is False:
        raise ConfigError("distributed.deepspeed.zero_optimization.compute_grad_norm=false: the "
                          "loop logs the gradient norm and checks it is finite; remove the entry.")
    if reduce_dtype not in COMMUNICATION_DTYPES:
        raise ConfigError(f"distributed.reduce_dtype={reduce_dtype!r}: use auto, fp32 or bf16.")
    chosen = overrides.get("communication_data_type")
    if chosen is not None and reduce_dtype != "auto" and chosen != reduce_dtype:
        raise ConfigError(
            f"distributed.deepspeed.communication_data_type={chosen} contradicts "
            f"distributed.reduce_dtype={reduce_dtype}: set one of them.")
    dtype = chosen or COMMUNICATION_DTYPES[reduce_dtype]
    if vendor == "amd" and dtype != "fp32":
        raise ConfigError(
            f"gradient communication in {dtype} on AMD GPUs: bf16 gradient all-reduce under "
            "DeepSpeed has a known NaN report on ROCm (accelerate forces fp32 there too), so "
            "DeepSpeed runs reduce gradients in fp32 on AMD. Remove "
            "distributed.deepspeed.communication_data_type / distributed.reduce_dtype.")


def build_config(strategy: str, *, micro_batch_size: int, grad_accum_steps: int,
                 mixed_precision: str, max_grad_norm: float, cpu_offload: bool = False,
                 reduce_dtype: str = "auto", overrides: Mapping | None = None,
                 vendor: str = "cpu") -> dict:
    """The DeepSpeed config of a run: the stage's defaults, then `overrides`
    (`distributed.deepspeed`) merged over them key by key.

    `mixed_precision` is the plan's (bf16 | fp16 | no): DeepSpeed's 16-bit mode then keeps
    16-bit weights and gradients with fp32 master weights in the optimizer. Gradients are
    communicated in fp32 (`reduce_dtype` or the override may choose bf16, except on AMD).
    `cpu_offload` moves the optimizer state and its step to host memory. Raises ConfigError
    for entries that contradict the run (`check_overrides`) or the plan's precision.
    """
    overrides = dict(overrides or {})
    check_overrides(strategy, overrides, reduce_dtype=reduce_dtype, vendor=vendor)
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected bf16, fp16 or no")
    for mode in ("bf16", "fp16"):
        enabled = (overrides.get(mode) or {}).get("enabled")
        if enabled is not None and bool(enabled) != (mode == mixed_precision):
            raise ConfigError(
                f"distributed.deepspeed.{mode}.enabled={enabled} contradicts the kernel plan's "
                f"precision ({mixed_precision}): choose it with kernels.precision and remove "
                "the entry.")
    zero: dict[str, Any] = {"stage": STAGES[strategy], "overlap_comm": True,
                            "contiguous_gradients": True}
    if cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": vendor != "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # DeepSpeed clips inside its step; 0 turns clipping off, as trainer.max_grad_norm=0 does.
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "communication_data_type": COMMUNICATION_DTYPES[reduce_dtype],
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        # The optimizer is the plan's torch optimizer (accelerate swaps in DeepSpeed's CPU Adam
        # when the optimizer state is offloaded).
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if mixed_precision == "bf16":
        # Skip a step whose gradients are not finite, as the loop's on_nan policy expects:
        # DeepSpeed applied such bf16 steps by default until deepspeedai/DeepSpeed#8035.
        config["bf16"]["check_grad_overflow"] = True
    return _merge(config, overrides)
