"""setup applies trainer.gradient_checkpointing=auto's decision to the model: layers recompute
only when the estimate at the data's row length does not fit the budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import finetune.distributed.checkpointing as checkpointing
from finetune.distributed.checkpointing import Budget
from finetune.train.trainer import Trainer


@pytest.mark.parametrize("budget, enabled", [(10**15, False), (1, True)])
def test_auto_decides_from_the_budget_and_the_model_follows(
        make_trainer: Callable[..., Trainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        budget: int, enabled: bool) -> None:
    monkeypatch.setattr(checkpointing, "memory_budget",
                        lambda profile, local=1: Budget(budget, "the test budget"))
    parts = make_trainer(tmp_path / "run").parts
    assert parts.checkpointing.enabled is enabled
    assert _checkpointing(parts.unwrapped) is enabled
    # The estimate the run prints is made with the data's rows and the choice.
    assert parts.strategy.estimate.seq_len == parts.data.stats.max_seq_len
    assert parts.strategy.estimate.gradient_checkpointing is enabled
    assert parts.checkpointing.reason.startswith("auto: without it single needs about ")


def test_explicit_true_checkpoints_whatever_the_budget(
        make_trainer: Callable[..., Trainer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpointing, "memory_budget",
                        lambda profile, local=1: Budget(10**15, "a lot"))
    parts = make_trainer(tmp_path / "run", "trainer.gradient_checkpointing=true").parts
    assert parts.checkpointing.enabled and _checkpointing(parts.unwrapped)
    assert parts.checkpointing.reason == "trainer.gradient_checkpointing=true"


def _checkpointing(model) -> bool:
    """Whether transformers' decoder layers recompute (their `gradient_checkpointing` flag)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
