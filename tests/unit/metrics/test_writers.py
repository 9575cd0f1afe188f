"""metrics.jsonl (write, read back, truncate on resume), the console line, and W&B."""

from __future__ import annotations

import io
import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.metrics import writers
from finetune.metrics.writers import (
    ConsoleProgress,
    MetricsFile,
    WandbLogger,
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
    progress.step({**RECORD, "mfu": 0.41234}, steps_this_session=2)
    assert stream.getvalue().splitlines() == [
        "step 12/100 | loss 1.2346 | lr 2.00e-04 | grad_norm 0.988 | 12346 tok/s | eta 0:44:00",
        "step 12/100 | loss 1.2346 | lr 2.00e-04 | grad_norm 0.988 | 12346 tok/s | mfu 41.2% "
        "| eta 0:44:00",
    ]


def test_console_defaults_to_stdout(capsys: pytest.CaptureFixture) -> None:
    ConsoleProgress(total_steps=1).line("eval at step 1: loss 2.0000")
    assert capsys.readouterr().out == "eval at step 1: loss 2.0000\n"


# ---------------------------------------------------------------- W&B


def test_wandb_run_is_resumed_by_id(fake_wandb, logger_cfg, tmp_path: Path) -> None:
    cfg = logger_cfg(name="wandb", project="proj", entity="team", run_name="r1",
                     mode="offline", tags=["a", "b"])
    resumed = WandbLogger(cfg, tmp_path, {"seed": 1}, resume_id="abc123")
    assert resumed.run_id == "abc123"
    assert fake_wandb.init_kwargs == {
        "project": "proj", "entity": "team", "name": "r1", "mode": "offline",
        "tags": ["a", "b"], "dir": str(tmp_path), "config": {"seed": 1},
        "id": "abc123", "resume": "allow"}
    fresh = WandbLogger(cfg, tmp_path, {}, resume_id=None)
    assert fresh.run_id == "fresh-run-id"
    assert (fake_wandb.init_kwargs["id"], fake_wandb.init_kwargs["resume"]) == (None, None)


def test_wandb_gets_only_finite_numbers_at_the_records_step(fake_wandb, logger_cfg,
                                                           tmp_path: Path) -> None:
    logger = WandbLogger(logger_cfg(name="wandb", mode="offline"), tmp_path, {}, None)
    logger.log({"step": 7, "loss": 1.5, "lr": math.nan, "grad_norm": 3, "mfu": None,
                "note": "text"})
    assert fake_wandb.logged == [({"step": 7, "loss": 1.5, "grad_norm": 3}, 7)]
    logger.finish({"last_loss": 1.5, "status": "done", "changes": ["x"], "eval_loss": None})
    assert fake_wandb.run.summary == {"last_loss": 1.5, "status": "done"}
    assert fake_wandb.finished == 1


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_without_network_never_writes_the_api_key(
        mode: str, logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real wandb package in offline/disabled mode: everything it writes (run dir, config,
    cache and data dirs, HOME) is searched for the key. Python-side connections to anything but
    loopback are recorded; wandb's own service process is kept off the network by the mode."""
    sentinel = "ftsentinel" + "5" * 30  # wandb expects a 40-character key
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the mode must come from the config
    for var in ("HOME", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    remote: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and \
                address[0] not in ("127.0.0.1", "::1", "localhost"):
            remote.append(address)
            raise OSError("network access in a unit test")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = WandbLogger(logger_cfg(name="wandb", mode=mode, project="p"), run_dir,
                         {"optim": {"lr": 1e-4}}, None)
    logger.log({"step": 1, "loss": 2.0})
    logger.finish({"last_loss": 2.0})
    assert logger.run.settings.mode == mode
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    if mode == "offline":  # the run really was recorded, under the run directory
        assert any(p.suffix == ".wandb" for p in run_dir.rglob("*"))
    assert [p for p in written if sentinel.encode() in p.read_bytes()] == []
    assert remote == []
