"""The loop's progress (`LoopState`) and the trainable weights a checkpoint carries.

`Trainer.state_dict()` combines them with the optimizer, scheduler, data position and RNG into a
`finetune.checkpoint.store.TrainerState`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from finetune.errors import CheckpointError


@dataclass
class LoopState:
    """Everything that advances with the steps and must survive a resume."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    nan_skipped: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The fields of `saved` this class knows (older checkpoints lack the eval fields)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (the adapter's, or every weight's)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                   checkpoint: Path) -> None:
    """Copy checkpointed trainable weights in; refuse another model's or adapter shape's."""
    own = trainable_state(model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    bad_shape = [n for n in own if n in tensors and tensors[n].shape != own[n].shape]
    if missing or extra or bad_shape:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {extra[:3]}" if extra else f"shape differs for {bad_shape[:3]}")
        raise CheckpointError(
            f"checkpoint {checkpoint} was saved from another model or adapter shape ({detail}). "
            "Resume with the same model and peft settings, or start a new output_dir.")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name].to(param.dtype))
