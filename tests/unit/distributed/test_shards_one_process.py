"""A sharded checkpoint resumed on one process, where no process group exists: it loads, and
torch's "torch.distributed is disabled ... assuming ... a single process" warning, which says
nothing the user needs, is not shown."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from finetune.distributed.engine import Replicated, save_shards


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_sharded_checkpoint_loads_on_one_process_without_torchs_warning(
        tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    assert not dist.is_initialized()
    saved, saved_optimizer = _model_and_optimizer(seed=0)
    model_state, optim_state = get_state_dict(saved, saved_optimizer)
    with warnings.catch_warnings():  # writing it here, without a group, warns too
        warnings.simplefilter("ignore")
        save_shards({"model": model_state, "optim": optim_state}, tmp_path)

    model, optimizer = _model_and_optimizer(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Replicated("single").load_state(model, optimizer, tmp_path, {}, {})
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []
    for (name, value), expected in zip(model.state_dict().items(),
                                       saved.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    assert not dist.is_initialized()  # loading left no process group behind
