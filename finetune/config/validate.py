"""Checks on values that types alone cannot express: closed sets and ranges.

Each failure names the key, the bad value and the accepted values, before any work starts.
"""

from __future__ import annotations

from finetune.config.schema import RunConfig
from finetune.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "peft.method": ("lora", "dora", "rslora", "none"),
    "peft.bias": ("none", "all", "lora_only"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.on_nan": ("stop", "skip"),
    "logger.name": ("console", "wandb"),
    "logger.mode": ("online", "offline", "disabled"),
    "data.truncation": ("truncate", "drop", "error"),
    "data.train_on": ("assistant", "all", "last_turn"),
    "data.on_bad_row": ("error", "skip"),
    "kernels.precision": ("auto", "bf16", "fp16", "fp32"),
    "kernels.compile": ("auto", "on", "off"),
}

POSITIVE = ("trainer.micro_batch_size", "trainer.grad_accum_steps", "trainer.epochs",
            "data.max_seq_len", "peft.r", "trainer.log_every_n_steps")
NON_NEGATIVE = ("trainer.save_every_n_steps", "trainer.keep_last_n", "trainer.eval_every_n_steps",
                "trainer.save_every_minutes", "optim.warmup_steps", "optim.weight_decay",
                "trainer.max_grad_norm", "trainer.eval_max_batches")


def _get(run: RunConfig, key: str):
    node = run
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_run_config(run: RunConfig) -> None:
    """Raise ConfigError for the first value outside its accepted set or range."""
    for key, allowed in CHOICES.items():
        value = _get(run, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid. Use one of: {', '.join(allowed)}.")
    for key in POSITIVE:
        if _get(run, key) <= 0:
            raise ConfigError(f"{key}={_get(run, key)} must be a positive number.")
    for key in NON_NEGATIVE:
        if _get(run, key) < 0:
            raise ConfigError(f"{key}={_get(run, key)} must be zero or positive.")
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
    if run.trainer.keep_best_by not in (None, "eval_loss"):
        raise ConfigError(f"trainer.keep_best_by={run.trainer.keep_best_by!r} is not valid. "
                          "Use null or eval_loss.")
    if len(run.optim.betas) != 2:
        raise ConfigError(f"optim.betas={list(run.optim.betas)} must have two values, e.g. "
                          "optim.betas=[0.9,0.999].")
