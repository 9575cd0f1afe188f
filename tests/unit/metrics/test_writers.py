"""metrics.jsonl (write, read back, truncate on resume), the plain console line, and the
hand-written W&B logger that setup.py still uses until it builds trackers."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.metrics import writers
from finetune.metrics.writers import (
    ConsoleProgress,
    MetricsFile,
    read_records,
    step_losses,
    truncate_metrics,
)

# ---------------------------------------------------------------- metrics.jsonl

ROWS = [
    {"step": 1, "loss": 3.0, "lr": 1e-4},
    {"step": 2, "loss": 2.5, "lr": 1e-4},
    {"step": 2, "eval_loss": 2.7},
    {"step": 3, "loss": 2.0, "lr": 1e-4},
    {"step": 4, "loss": 1.5, "lr": 1e-4},
    {"step": 4, "eval_loss": 2.1},
    {"step": 5, "loss": 1.0, "lr": 1e-4},
]


def _write_rows(path: Path, rows: list[dict], tail: str = "") -> list[str]:
    lines = [json.dumps(row, sort_keys=True) for row in rows]
    path.write_text("".join(line + "\n" for line in lines) + tail, encoding="utf-8")
    return lines


def test_metrics_file_is_readable_line_by_line_while_open(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsFile(path)
    try:
        for count, row in enumerate(ROWS[:3], start=1):
            metrics.write(row)
            lines = path.read_text(encoding="utf-8").split("\n")
            assert lines[-1] == ""  # every record ends its line: no torn tail for a follower
            assert [json.loads(line) for line in lines[:-1]] == ROWS[:count]
    finally:
        metrics.close()


def test_metrics_file_appends_to_an_existing_run(tmp_path: Path) -> None:
    """A resumed run reopens metrics.jsonl: earlier steps must survive."""
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, ROWS[:2])
    metrics = MetricsFile(path)
    metrics.write(ROWS[3])
    metrics.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [*ROWS[:2], ROWS[3]]


def test_records_are_forced_to_disk_at_most_every_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record is flushed at once; fsync (milliseconds on network filesystems) runs only
    when the interval has passed, and at close."""
    clock = _Clock(0.0)
    monkeypatch.setattr(writers, "time", SimpleNamespace(monotonic=clock.monotonic))
    synced: list[float] = []
    monkeypatch.setattr(writers.os, "fsync", lambda fd: synced.append(clock.now))
    metrics = MetricsFile(tmp_path / "metrics.jsonl", sync_every_s=10.0)
    for now in (1.0, 5.0, 11.0, 12.0):
        clock.now = now
        metrics.write({"step": int(now), "loss": 1.0})
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 1
    clock.now = 13.0
    metrics.close()
    metrics.close()
    assert synced == [11.0, 13.0]


def test_read_records_keeps_every_row_and_skips_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, ROWS[:3], tail='{"step": 3, "lo')
    assert read_records(path) == ROWS[:3]
    assert read_records(tmp_path / "absent.jsonl") == []


def test_step_losses_skip_eval_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, ROWS)
    assert step_losses(path) == [3.0, 2.5, 2.0, 1.5, 1.0]
    assert step_losses(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize("k", [0, 2, 3, 4, 9])
def test_truncate_keeps_exactly_the_rows_up_to_the_step(tmp_path: Path, k: int) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = _write_rows(path, ROWS)
    truncate_metrics(path, k)
    expected = [line for line, row in zip(lines, ROWS, strict=True) if row["step"] <= k]
    assert path.read_text(encoding="utf-8") == "".join(line + "\n" for line in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no .tmp left


def test_truncate_drops_a_torn_last_line(tmp_path: Path) -> None:
    """A crash mid-write leaves half a record; the resumed run must not keep it."""
    path = tmp_path / "metrics.jsonl"
    lines = _write_rows(path, ROWS[:4], tail='{"loss": 1.5, "lr": 0.0001, "st')
    truncate_metrics(path, 10)
    assert path.read_text(encoding="utf-8") == "".join(line + "\n" for line in lines)
    assert step_losses(path) == [3.0, 2.5, 2.0]


def test_truncate_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- console


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


RECORD = {"step": 12, "loss": 1.234567, "lr": 2e-4, "grad_norm": 0.98765,
          "tokens_per_s": 12345.6}


def test_console_line_has_every_field_and_eta_from_this_sessions_pace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed at step 10: 2 steps took 60 s, so 88 steps left take 44 minutes."""
    clock = _Clock(1000.0)
    monkeypatch.setattr(writers, "time", SimpleNamespace(monotonic=clock.monotonic))
    stream = io.StringIO()
    progress = ConsoleProgress(total_steps=100, stream=stream)
    clock.now = 1060.0
    progress.step(RECORD, steps_this_session=2)
    progress.step({**RECORD, "mfu": 0.41234, "peak_mem_gb": 12.3456}, steps_this_session=2)
    assert stream.getvalue().splitlines() == [
        "step 12/100 | loss 1.2346 | lr 2.00e-04 | grad_norm 0.988 | 12346 tok/s | eta 0:44:00",
        "step 12/100 | loss 1.2346 | lr 2.00e-04 | grad_norm 0.988 | 12346 tok/s | mfu 41.2% "
        "| mem 12.35 GiB | eta 0:44:00",
    ]


def test_console_defaults_to_stdout(capsys: pytest.CaptureFixture) -> None:
    ConsoleProgress(total_steps=1).line("eval at step 1: loss 2.0000")
    assert capsys.readouterr().out == "eval at step 1: loss 2.0000\n"
