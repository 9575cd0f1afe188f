"""Checks that types alone cannot express: ranges and combinations of keys.

Closed sets are Enum fields of the schema, which OmegaConf checks itself; kernel names are
checked by the kernel planner against its registries. Each failure here names the key, the bad
value and what is accepted, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass

from finetune.config.schema import RunConfig
from finetune.distributed.requirements import check_qlora_strategy
from finetune.errors import ConfigError

POSITIVE = ("trainer.micro_batch_size", "trainer.grad_accum_steps", "trainer.epochs",
            "peft.r", "trainer.log_every_n_steps", "eval.max_new_tokens")
NON_NEGATIVE = ("trainer.save_every_n_steps", "trainer.keep_last_n", "trainer.eval_every_n_steps",
                "trainer.save_every_minutes", "optim.warmup_steps", "optim.weight_decay",
                "trainer.max_grad_norm", "trainer.eval_max_batches", "trainer.prefetch",
                "eval.generate_every_n_steps")


def _get(run: RunConfig, key: str):
    node = run
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _non_finite(node: object, prefix: str = "") -> str | None:
    """The first key holding a NaN or infinite number, or None."""
    for f in fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            found = _non_finite(value, f"{key}.")
            if found:
                return found
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return key
    return None


def validate_run_config(run: RunConfig) -> None:
    """Raise ConfigError for the first value outside its accepted range or combination."""
    bad = _non_finite(run)
    if bad is not None:
        raise ConfigError(f"{bad}={_get(run, bad)} is not a finite number; give a real value "
                          f"(e.g. {bad}={_get(RunConfig(), bad)}).")
    for key in POSITIVE:
        if _get(run, key) <= 0:
            raise ConfigError(f"{key}={_get(run, key)} must be a positive number.")
    for key in NON_NEGATIVE:
        if _get(run, key) < 0:
            raise ConfigError(f"{key}={_get(run, key)} must be zero or positive.")
    length = run.data.max_seq_len
    if length != "auto" and (isinstance(length, bool) or not isinstance(length, int)
                             or length < 2):
        raise ConfigError(f"data.max_seq_len={length!r} must be auto (99% of rows fit, within "
                          "the model's context) or a whole number of tokens, 2 or more, e.g. "
                          "data.max_seq_len=2048.")
    checkpointing = run.trainer.gradient_checkpointing
    if checkpointing is not True and checkpointing is not False and checkpointing != "auto":
        raise ConfigError(f"trainer.gradient_checkpointing={checkpointing!r} must be auto (on "
                          "only when the memory estimate does not fit the device), true or "
                          "false, e.g. trainer.gradient_checkpointing=true.")
    if run.trainer.max_steps == 0 or run.trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={run.trainer.max_steps} must be positive, or -1 to "
                          "run trainer.epochs full passes over the data.")
    if not 0.0 <= run.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio={run.optim.warmup_ratio} must be in [0, 1).")
    if not 0.0 <= run.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={run.optim.min_lr_ratio} must be in [0, 1].")
    if run.optim.lr <= 0:
        raise ConfigError(f"optim.lr={run.optim.lr} must be positive (e.g. optim.lr=2e-4).")
    if run.resume not in (None, "auto") and not isinstance(run.resume, str):
        raise ConfigError(f"resume={run.resume!r} must be null, auto, or a checkpoint path.")
    # distributed=auto is checked once resolved, when the strategy wraps the loaded model.
    check_qlora_strategy(str(run.distributed.strategy), str(run.peft.method))
    if len(run.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(run.optim.betas)} must have two values, e.g. "
                          "optim.betas=[0.9,0.999].")
