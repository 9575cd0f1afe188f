"""The weights that train: read them out of a model for a checkpoint, and copy a checkpoint's
back in, refusing another model's or adapter shape's."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.errors import CheckpointError


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
