"""Each resume's config changes are kept with the step it resumed at, carried through later
checkpoints, and all of them reach summary.json and the end-of-run summary."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.metrics.banner import summary_rows
from finetune.metrics.summary import run_summary
from finetune.train.state import LoopState


def test_every_resumes_changes_reach_the_summary(tmp_path: Path) -> None:
    state = LoopState(step=3)
    state.record_resume(["trainer.max_steps: 12 -> 14"], [])
    state.step = 6
    saved = state.to_dict()  # the checkpoint at step 6 carries the first resume's changes
    resumed = LoopState.from_dict(saved)
    resumed.record_resume(["trainer.log_every_n_steps: 1 -> 2"], ["seed: 42 -> 3"])
    resumed.step = 7
    resumed.record_resume([], [])  # a resume that changed nothing adds nothing
    assert saved["resume_changes"] == [{"step": 3, "changes": ["trainer.max_steps: 12 -> 14"]}]

    progress = {**resumed.to_dict(), "elapsed_s": 1.0}
    summary = run_summary(progress, [1.0], {}, total_steps=14, world_size=1,
                          device=torch.device("cpu"), resume_changes=resumed.resume_changes,
                          forced_changes=resumed.resume_forced_changes)
    assert summary["resume_changes"] == [
        {"step": 3, "changes": ["trainer.max_steps: 12 -> 14"]},
        {"step": 6, "changes": ["trainer.log_every_n_steps: 1 -> 2"]}]
    assert summary["resume_forced_changes"] == [{"step": 6, "changes": ["seed: 42 -> 3"]}]
    rows = summary_rows(summary, run_dir=tmp_path, final=tmp_path / "final")
    assert [r for r in rows if "on resume" in r[0]] == [
        ("changed on resume", "at step 3: trainer.max_steps: 12 -> 14"),
        ("changed on resume", "at step 6: trainer.log_every_n_steps: 1 -> 2"),
        ("FORCED on resume", "at step 6: seed: 42 -> 3")]


def test_a_checkpoint_from_before_the_history_was_kept_loads() -> None:
    state = LoopState.from_dict({"step": 5, "tokens_seen": 10, "elapsed_s": 1.0,
                                 "nan_skipped": 0})
    assert state.resume_changes == [] and state.resume_forced_changes == []
