"""A checkpoint holds the data position after the batches the loop consumed, not after those
the feed built ahead: read from the checkpoint as written (not after fit() has set the data
back), it equals the position of a fresh iterator advanced by the batches consumed."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from finetune.checkpoint import store

RUN = ("trainer.max_steps=3", "trainer.grad_accum_steps=2", "trainer.save_every_n_steps=2",
       "trainer.prefetch=4")


def _position_after(batches, consumed: int) -> dict:
    for _ in islice(iter(batches), consumed):
        pass
    return batches.state_dict()


def test_the_saved_data_position_is_the_consumed_one(make_trainer, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", *RUN)
    trainer.fit()
    trainer.close()
    [(step, path)] = store.list_checkpoints(tmp_path / "run")
    saved = store.load_checkpoint(path).state.progress["data"]

    fresh = make_trainer(tmp_path / "fresh", *RUN)
    fresh.close()
    batches = fresh.data.train
    assert step == 2
    assert saved == _position_after(batches, 2 * 2)  # 2 steps of 2 micro-batches
    assert saved["position"] > 0
    # And once fit() is over, the position after its 3 steps.
    assert trainer.state_dict().progress["data"] == _position_after(batches, 2)
