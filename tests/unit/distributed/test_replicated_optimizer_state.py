"""A replicated checkpoint (single, ddp) gives back AdamW's moments and step as saved."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.checkpoint.trainable import trainable_state
from finetune.distributed.engine import Replicated


def _stepped(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_the_optimizer_moments_come_back_as_saved(tmp_path: Path) -> None:
    saved_model, saved_optimizer = _stepped(0)
    trainable = {k: v.detach().clone() for k, v in trainable_state(saved_model).items()}
    saved = saved_optimizer.state_dict()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    Replicated("single").load_state(model, optimizer, tmp_path, trainable, saved)
    loaded = optimizer.state_dict()["state"]
    assert sorted(loaded) == sorted(saved["state"]) == [0, 1]
    for index, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[index][key], state[key]), (index, key)
    assert torch.equal(model.weight, saved_model.weight)
