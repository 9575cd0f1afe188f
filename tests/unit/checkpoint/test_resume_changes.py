"""Resuming on another number of processes: the change, and the global batch it changes, are
listed among the changes on resume (printed, and kept in summary.json)."""

from __future__ import annotations

from finetune.checkpoint.compat import check_resume_compatible

SAVED = "seed: 1\ntrainer:\n  max_steps: 10\n  micro_batch_size: 4\n  grad_accum_steps: 2\n"


def _current(micro_batch_size: int = 4, grad_accum_steps: int = 2) -> dict:
    return {"seed": 1, "trainer": {"max_steps": 10, "micro_batch_size": micro_batch_size,
                                   "grad_accum_steps": grad_accum_steps}}


def test_fewer_processes_list_the_world_size_and_the_smaller_global_batch() -> None:
    allowed, forced = check_resume_compatible(SAVED, _current(), force=False, checkpoint="c",
                                              saved_world_size=2, world_size=1)
    assert allowed == [
        "world size: 2 -> 1 processes",
        "global batch: 16 -> 8 rows per optimizer step "
        "(trainer.micro_batch_size x trainer.grad_accum_steps x processes)"]
    assert forced == []


def test_a_world_size_made_up_by_accumulation_lists_no_global_batch_change() -> None:
    allowed, _ = check_resume_compatible(SAVED, _current(grad_accum_steps=4), force=False,
                                         checkpoint="c", saved_world_size=2, world_size=1)
    assert allowed == ["world size: 2 -> 1 processes", "trainer.grad_accum_steps: 2 -> 4"]


def test_a_batch_setting_that_changes_the_global_batch_says_so() -> None:
    allowed, _ = check_resume_compatible(SAVED, _current(micro_batch_size=2), force=False,
                                         checkpoint="c", saved_world_size=2, world_size=2)
    assert allowed == ["global batch: 16 -> 8 rows per optimizer step "
                       "(trainer.micro_batch_size x trainer.grad_accum_steps x processes)",
                       "trainer.micro_batch_size: 4 -> 2"]


def test_the_same_world_size_or_an_unknown_one_adds_nothing() -> None:
    for saved_world_size in (2, None):  # None: a checkpoint that did not record it
        allowed, _ = check_resume_compatible(SAVED, _current(), force=False, checkpoint="c",
                                             saved_world_size=saved_world_size, world_size=2)
        assert allowed == []
