"""A resume restores the random number generators: with LoRA dropout every step draws random
numbers, so a resume that does not restore them gives other losses than the straight run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Three steps, split after two: LoRA's B starts at zero, so the first loss sees no dropout; the
# third is the first step after the resume, and its loss depends on the restored RNG.
DROPOUT = ("trainer.max_steps=3", "peft.dropout=0.5")


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_resume_with_dropout_gives_the_straight_runs_losses_bitwise(
        make_trainer, tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "straight", *DROPOUT)
    straight.fit()
    straight.close()

    first = make_trainer(tmp_path / "split", *DROPOUT)
    first.total_steps = 2
    first.fit()
    state = first.state_dict()
    first.close()
    second = make_trainer(tmp_path / "split", *DROPOUT)  # setup seeds the RNG afresh
    second.load_state_dict(state, source=tmp_path / "split")
    second.fit()
    second.close()

    losses = _losses(tmp_path / "straight")
    assert len(losses) == 3
    assert _losses(tmp_path / "split") == losses
    for name, tensor in second.state_dict().trainable.items():
        assert torch.equal(tensor, straight.state_dict().trainable[name]), name

    # The oracle can fail: the same two steps from another RNG state (the same weights, data
    # and optimizer) give another second loss.
    other = make_trainer(tmp_path / "other", *DROPOUT)
    torch.manual_seed(4321)
    other.total_steps = 2
    other.fit()
    other.close()
    assert _losses(tmp_path / "other") != losses[:2]
