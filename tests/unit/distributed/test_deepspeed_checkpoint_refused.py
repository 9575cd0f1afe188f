"""A checkpoint written by a DeepSpeed run (its `deepspeed/` folder) is refused by the other
engines before anything is loaded, naming the strategies that read it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.distributed.engine import FullyShard, Replicated
from finetune.errors import CheckpointError


@pytest.mark.parametrize("engine", [Replicated("single"), Replicated("ddp"), FullyShard()],
                         ids=["single", "ddp", "fsdp2"])
def test_a_deepspeed_checkpoint_is_refused_before_anything_loads(engine, tmp_path: Path) -> None:
    (tmp_path / "deepspeed").mkdir()
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters())
    saved = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="written by a DeepSpeed run") as err:
        engine.load_state(model, optimizer, tmp_path, saved, optimizer.state_dict())
    assert "deepspeed_zero2 or deepspeed_zero3" in str(err.value)
    assert torch.equal(model.weight, before)
