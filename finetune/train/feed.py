"""Feed the loop without stalls: micro-batches are built ahead of the step on a background thread.

Why a thread and not DataLoader workers: the batch source is one resumable iterator
(`ResumableBatches`) whose exact position must be known for every batch the loop consumes, and
building a batch is numpy work plus `torch.from_numpy`, which release the GIL for their heavy
parts. A thread keeps one process: no pickling of the tokenized arrays into workers, no forked
CUDA state, and the order of batches cannot change.

Resume stays exact: each batch travels with the data position *after* it (taken on the producer
thread right after the batch was built), and the loop records the position of the batches it
consumed, never of those merely prefetched. On CUDA/ROCm/XPU the batches are pinned on the
producer thread and copied with `non_blocking=True`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch (tensors, flex-attention BlockMasks) to `device`; pinned tensors
    are copied asynchronously. Other values stay as they are: the collator's host-side
    sequence boundaries (Python ints) must not become device tensors, or every attention
    layer reading them would wait for the device."""
    non_blocking = device.type != "cpu"
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor)
                else v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def pins_batches(device: torch.device) -> bool:
    """Whether batches for `device` are pinned: on CUDA, ROCm (device type cuda) and XPU, whose
    host-to-device copies run asynchronously from page-locked memory (`pin_memory()` pins for
    the current accelerator); not on the CPU, nor on MPS, whose memory the host shares."""
    return device.type in ("cuda", "xpu")


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v)
            for k, v in batch.items()}


class BatchFeed:
    """Micro-batches of `batches` with the data position after each, `depth` built ahead.

    `depth=0` builds each batch when the loop asks for it (no thread). `wait_s` accumulates
    the time the loop spent waiting for batches; `take_wait()` returns it and starts over.
    Errors raised while building a batch (bad data found while streaming) reach the loop at
    the batch where they happened. Call `close()` when done.
    """

    def __init__(self, batches: Any, *, depth: int, pin: bool = False) -> None:
        self._batches = batches
        self._iterator: Iterator[dict[str, Any]] = iter(batches)
        self._pin = pin
        self.depth = depth
        self._wait = 0.0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="finetune-batch-feed",
                                            daemon=True)
            self._thread.start()

    def _build(self) -> tuple[dict[str, Any], dict[str, Any]]:
        batch = next(self._iterator)
        state = self._batches.state_dict()
        return (_pinned(batch) if self._pin else batch), state

    def _produce(self) -> None:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                item: Any = self._build()
            except BaseException as exc:  # handed to the loop, raised there
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next micro-batch and the data position after it."""
        started = time.perf_counter()
        if self._queue is None:
            item: Any = self._build()
        else:
            item = self._queue.get()
        self._wait += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def take_wait(self) -> float:
        """Seconds waited for batches since the last call."""
        wait, self._wait = self._wait, 0.0
        return wait

    def close(self) -> None:
        """Stop building batches (a batch being built is finished and dropped)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.1)
