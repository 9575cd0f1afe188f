"""A resume restores the random number generators: with LoRA dropout every step draws random
numbers, so a resume that does not restore them gives other losses than the straight run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DROPOUT = ("trainer.max_steps=4", "peft.dropout=0.5")


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
    assert _losses(tmp_path / "split") == losses
    for name, tensor in second.state_dict().trainable.items():
        assert torch.equal(tensor, straight.state_dict().trainable[name]), name


def test_dropout_draws_make_the_rng_matter(make_trainer, tmp_path: Path) -> None:
    """The oracle above can fail: the same steps from another RNG state give other losses
    (from the second step on: LoRA's B starts at zero, so the first loss sees no dropout)."""
    first = make_trainer(tmp_path / "a", *DROPOUT)
    first.total_steps = 2
    first.fit()
    first.close()
    torch.manual_seed(1234)  # another RNG state, the same weights, data and optimizer
    other = make_trainer(tmp_path / "b", *DROPOUT)
    torch.manual_seed(4321)
    other.total_steps = 2
    other.fit()
    other.close()
    assert _losses(tmp_path / "a") != _losses(tmp_path / "b")
