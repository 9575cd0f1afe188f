"""The batch feed: batches built ahead, the position of consumed batches only, errors where they
happen, and the time the loop waited."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from finetune.train import feed as feed_module
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
        deadline = time.monotonic() + 60  # a wait for the thread, not a timing check
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


class Clock:
    """A clock that moves only when a batch is built: each build takes `build_s`."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class GatedSource(Source):
    """Builds a batch (moving `clock` by `build_s`) only once `gate` lets it."""

    def __init__(self, clock: Clock, build_s: float) -> None:
        super().__init__()
        self.clock, self.build_s, self.gate = clock, build_s, threading.Semaphore(0)

    def __iter__(self):
        for batch in super().__iter__():
            self.gate.acquire()
            self.clock.now += self.build_s
            yield batch


def test_the_wait_is_measured_and_prefetch_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(feed_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    built_here = GatedSource(clock, build_s=0.25)
    built_here.gate.release(3)
    slow = BatchFeed(built_here, depth=0)
    for _ in range(3):
        slow.next()
    assert slow.take_wait() == 0.75  # each batch built while the loop waited
    assert slow.take_wait() == 0.0

    built_ahead = GatedSource(clock, build_s=0.25)
    built_ahead.gate.release(4)
    ahead = BatchFeed(built_ahead, depth=4)
    deadline = time.monotonic() + 60  # a wait for the thread, not a timing check
    while not ahead._queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The 4 batches were built ahead; the next build waits at the gate: no wait to measure.
    for i in range(4):
        batch, _ = ahead.next()
        assert int(batch["input_ids"][0, 0]) == i
    assert ahead.take_wait() == 0.0
    built_ahead.gate.release(100)
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
