"""Checks of the data.* settings that need no data, shared by in-memory and streaming runs.

`check_settings` runs before any file is opened (a data.format name is looked up in the FORMATS
registry, formats.format_named); `mixture_weights` reads data.weights against the number of
data.path entries; `setting_choice` reads a closed-set setting through its config Enum, so the
allowed values are listed once, in finetune.config.data.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from finetune.config.data import DataConfig
from finetune.data.errors import DataError
from finetune.data.formats import format_named

E = TypeVar("E", bound=Enum)


def check_settings(cfg: DataConfig) -> None:
    """Raise DataError for a data.* setting that cannot work, before any data is read."""
    if not 0.0 <= float(cfg.val_split) < 1.0:
        raise DataError(f"data.val_split={cfg.val_split} must be in [0, 1)")
    if cfg.stream_buffer < 1:
        raise DataError(f"data.stream_buffer={cfg.stream_buffer} must be at least 1")
    if cfg.format != "auto":
        format_named(cfg.format)
    if cfg.num_proc < 0:
        raise DataError(f"data.num_proc={cfg.num_proc} must be 0 (one process per CPU) or more")


def setting_choice(choices: type[E], value: Any, key: str) -> E:
    """`value` as a member of the config Enum `choices` (finetune.config.data), for library
    callers that pass a plain string; DataError naming data.`key` and the choices."""
    try:
        return choices(value)
    except ValueError:
        raise DataError(f"data.{key}={value!r} is not one of "
                        f"{', '.join(choices.__members__)}") from None


def mixture_weights(weights: Any, n_sources: int) -> list[float] | None:
    """data.weights as one float per data.path entry (None: no mixture); DataError when they
    do not match the paths or are not non-negative numbers with a positive sum."""
    if weights is None:
        return None
    values = [weights] if isinstance(weights, (int, float)) else list(weights)
    if len(values) != n_sources:
        raise DataError(f"data.weights has {len(values)} values for {n_sources} data.path "
                        "entries; give one weight per path")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"data.weights must be numbers, got {weights!r}") from None
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"data.weights must be non-negative with a positive sum, got {values}")
    return values
