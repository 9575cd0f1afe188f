"""The batch feed: batches built ahead, the position of consumed batches only, errors where they
happen, and the time the loop waited."""

from __future__ import annotations

import time

import pytest
import torch

from finetune.train.feed import BatchFeed, to_device


class Source:
    """A resumable batch source like TrainBatches: batch i holds i; position counts batches."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.position, self.fail_at, self.delay = 0, fail_at, delay

    def __iter__(self):
        while True:
            if self.position == self.fail_at:
                raise ValueError(f"bad row in batch {self.position}")
            time.sleep(self.delay)
            batch = {"input_ids": torch.full((1, 2), self.position)}
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}


@pytest.mark.parametrize("depth", [0, 3])
def test_each_batch_comes_with_the_position_after_it(depth: int) -> None:
    source = Source()
    feed = BatchFeed(source, depth=depth)
    for i in range(5):
        batch, state = feed.next()
        assert int(batch["input_ids"][0, 0]) == i
        assert state == {"position": i + 1}
    if depth:
        deadline = time.monotonic() + 5
        while source.position < 5 + depth and time.monotonic() < deadline:
            time.sleep(0.01)
        # built ahead (the queue, plus one waiting to enter it), yet not reported as consumed
        assert 5 + depth <= source.position <= 5 + depth + 1
    feed.close()


def test_an_error_reaches_the_loop_at_its_batch() -> None:
    feed = BatchFeed(Source(fail_at=2), depth=4)
    feed.next()
    feed.next()
    with pytest.raises(ValueError, match="batch 2"):
        feed.next()
    feed.close()


def test_the_wait_is_measured_and_prefetch_hides_it() -> None:
    slow = BatchFeed(Source(delay=0.05), depth=0)
    for _ in range(3):
        slow.next()
    assert slow.take_wait() >= 0.14
    assert slow.take_wait() == 0.0
    ahead = BatchFeed(Source(delay=0.05), depth=4)
    time.sleep(0.4)  # the step's compute, during which the feed builds ahead
    for _ in range(4):
        ahead.next()
    assert ahead.take_wait() < 0.05
    ahead.close()


def test_close_stops_the_thread() -> None:
    feed = BatchFeed(Source(), depth=2)
    feed.next()
    feed.close()
    assert feed._thread is not None and not feed._thread.is_alive()


def test_to_device_keeps_tensors_and_other_values() -> None:
    batch = {"input_ids": torch.ones(1, 2), "note": "x"}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["input_ids"], batch["input_ids"]) and moved["note"] == "x"


def test_trainer_saves_the_consumed_position_with_prefetch(make_trainer, tmp_path) -> None:
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=3", "trainer.prefetch=4")
    trainer.fit()
    state = trainer.state_dict()
    trainer.close()
    assert state.progress["data"]["position"] == 3 * 2  # 3 steps of micro-batch 2
    assert trainer.data.train.state_dict()["position"] == 3 * 2  # rewound after prefetching
