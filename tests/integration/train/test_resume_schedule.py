"""A resume runs every step with the schedule and optimizer settings of its own config.

The checkpoint's optimizer state carries the learning rate its own schedule computed for the
next step (and its weight decay, betas, eps); a resume that changes `trainer.max_steps` or an
`optim.*` value must not take the first step, or any step, with those.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.train.schedule import lr_factor


def _steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_a_resume_that_lengthens_the_run_follows_the_new_schedule(make_trainer,
                                                                  tmp_path: Path) -> None:
    # lr 2e-3, one warmup step, cosine. The first 2 steps are the same under max_steps 4 and 6
    # (warmup, then the cosine's start), so a run of 4 stopped at step 2 is the checkpoint a
    # run of 6 would have written there.
    warmup = "optim.warmup_steps=1"
    straight = make_trainer(tmp_path / "straight", "trainer.max_steps=6", warmup)
    straight.fit()
    straight.close()

    first = make_trainer(tmp_path / "split", "trainer.max_steps=4", warmup)
    first.total_steps = 2  # stopped, as a preemption would
    first.fit()
    state = first.state_dict()
    first.close()
    torch.manual_seed(1234)
    resumed = make_trainer(tmp_path / "split", "trainer.max_steps=6", warmup)
    resumed.load_state_dict(state, source=tmp_path / "split")
    resumed.fit()
    resumed.close()

    done, split = _steps(tmp_path / "straight"), _steps(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7))
    schedule = [2e-3 * lr_factor(i, total_steps=6, warmup=1, kind="cosine", min_ratio=0.0)
                for i in range(6)]
    assert [r["lr"] for r in done] == schedule
    assert [r["lr"] for r in split] == schedule  # step 3 once took the 4-step schedule's rate
    old_step_3 = 2e-3 * lr_factor(2, total_steps=4, warmup=1, kind="cosine", min_ratio=0.0)
    assert old_step_3 != schedule[2]
    assert [r["loss"] for r in split] == [r["loss"] for r in done]
    for name, tensor in resumed.state_dict().trainable.items():
        assert torch.equal(tensor, straight.state_dict().trainable[name]), name


def test_optimizer_settings_changed_on_resume_are_used(make_trainer, tmp_path: Path) -> None:
    first = make_trainer(tmp_path / "run", "trainer.max_steps=4")
    first.total_steps = 2
    first.fit()
    state = first.state_dict()
    first.close()
    changed = make_trainer(tmp_path / "changed", "trainer.max_steps=4", "optim.lr=1e-3",
                           "optim.weight_decay=0.1", "optim.betas=[0.8,0.95]", "optim.eps=1e-6",
                           "optim.scheduler=constant")
    changed.load_state_dict(state, source=tmp_path / "run")
    group = changed.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1
    assert tuple(group["betas"]) == (0.8, 0.95)
    assert group["eps"] == 1e-6
    assert group["lr"] == 1e-3 * lr_factor(2, total_steps=4, warmup=5, kind="constant",
                                           min_ratio=0.0)
    assert changed.scheduler.get_last_lr() == [group["lr"]]
    changed.close()
