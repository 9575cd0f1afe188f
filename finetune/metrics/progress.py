"""Progress of the long steps before and after training: tokenizing a large dataset, loading a
model, writing a merged model.

    with task("tokenizing data/train.jsonl", total=rows, unit="rows") as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))

Only rank 0 (the RANK environment variable, as set by torchrun) shows anything. On a terminal
it is a rich progress bar on stderr, replaced by the closing log line when done; elsewhere, or
while the step display is live, it is log lines: one at the start, one every `every_s` seconds
with the count so far, and one at the end with the time taken. A task without `total` shows a count (or only
its time) instead of a percentage.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from finetune.metrics.display import live_display_active

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


class TaskProgress:
    """The handle `task` yields: report work done with `advance(n)` or `update(completed)`."""

    def __init__(self, description: str, total: int | None, unit: str, every_s: float,
                 bar: Progress | None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed = 0
        self.every_s = every_s
        self._bar = bar
        self._bar_task = bar.add_task(description, total=total) if bar is not None else None
        self._last_line = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: int) -> None:
        self.completed = completed
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=completed)
        elif self.every_s > 0 and time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            logger.info("%s: %s", self.description, self.count())

    def count(self) -> str:
        """`1,200/4,000 rows (30%)`, or `1,200 rows` without a total; '' before any report."""
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.completed:,}/{self.total:,}{unit} ({self.completed / self.total:.0%})"
        return f"{self.completed:,}{unit}" if self.completed else ""


class _Quiet(TaskProgress):
    """What other ranks get: counts are kept, nothing is shown."""

    def __init__(self) -> None:
        super().__init__("", None, "", 0.0, None)

    def update(self, completed: int) -> None:
        self.completed = completed


def _bar(stream: TextIO) -> Progress | None:
    console = Console(file=stream, highlight=False)
    if not console.is_terminal or console.is_dumb_terminal or live_display_active():
        return None
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TaskProgressColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


@contextmanager
def task(description: str, total: int | None = None, *, unit: str = "",
         every_s: float = 30.0, stream: TextIO | None = None) -> Iterator[TaskProgress]:
    """Show the progress of `description` while the block runs (see the module docstring).

    `total` is the amount of work when known (rows, files, bytes), `unit` its name; `stream`
    is where a progress bar draws (stderr by default). An exception propagates unchanged and
    is not reported as done.
    """
    if not _is_main_process():
        yield _Quiet()
        return
    bar = _bar(stream or sys.stderr)
    progress = TaskProgress(description, total, unit, every_s, bar)
    started = time.monotonic()
    if bar is None:
        logger.info("%s ...", description)
    else:
        bar.start()
    try:
        yield progress
    finally:
        if bar is not None:
            bar.stop()
    done = f", {progress.completed:,}{f' {unit}' if unit else ''}" if progress.completed else ""
    logger.info("%s: done in %.1f s%s", description, time.monotonic() - started, done)
