"""Progress of long preparation steps: log lines off a terminal, a bar on one, silence on the
other ranks."""

from __future__ import annotations

import io
import logging

import pytest

from finetune.metrics import progress as progress_module
from finetune.metrics.progress import task


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake.monotonic)
    return fake


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "finetune.metrics.progress"]


def test_off_a_terminal_a_task_logs_start_progress_and_end(
        clock: _Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="finetune.metrics.progress"):
        with task("tokenizing train.jsonl", total=4000, unit="rows", every_s=30,
                  stream=io.StringIO()) as progress:
            clock.now += 10
            progress.advance(1000)  # 10 s: too soon for a line
            clock.now += 25
            progress.advance(1000)  # 35 s: one line
            clock.now += 5
            progress.update(4000)
    assert _messages(caplog) == [
        "tokenizing train.jsonl ...",
        "tokenizing train.jsonl: 2,000/4,000 rows (50%)",
        "tokenizing train.jsonl: done in 40.0 s, 4,000 rows",
    ]


def test_a_task_without_a_total_reports_its_time(clock: _Clock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="finetune.metrics.progress"):
        with task("loading model tiny", stream=io.StringIO()):
            clock.now += 2.5
    assert _messages(caplog)[-1] == "loading model tiny: done in 2.5 s"


def test_a_failing_task_is_not_reported_done(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="finetune.metrics.progress"):
        with pytest.raises(KeyError), task("merging", stream=io.StringIO()):
            raise KeyError("boom")
    assert not any("done" in message for message in _messages(caplog))


def test_other_ranks_show_nothing(monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.DEBUG, logger="finetune.metrics.progress"):
        with task("tokenizing", total=10) as progress:
            progress.advance(10)
    assert _messages(caplog) == [] and progress.completed == 10


def test_on_a_terminal_a_bar_is_drawn(monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    from rich.console import Console

    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "Console",
                        lambda file, **kw: Console(file=file, force_terminal=True,
                                                   color_system=None, width=100))
    with caplog.at_level(logging.INFO, logger="finetune.metrics.progress"):
        with task("writing the merged model", total=3, unit="files", stream=stream) as progress:
            progress.advance(2)
    assert "writing the merged model" in stream.getvalue()
    assert _messages(caplog)[-1].startswith("writing the merged model: done in")
