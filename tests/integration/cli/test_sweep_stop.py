"""A signal stops a sweep: the jobs after the one it reached do not start, and resume=auto
keeps the finished jobs, continues the stopped one and runs the rest."""

from __future__ import annotations

import os
import signal
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune.train.run_dir import LOCK_NAME, RunDirLock
from finetune.train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler

Cli = Callable[..., Any]  # conftest.cli: (*args) -> (code, out, err)


def _fake_runs(monkeypatch: pytest.MonkeyPatch, signal_in_job: int | None,
               code_after_signal: int) -> list:
    """Replace the recipe runner: each job records its config; job `signal_in_job` gets a real
    SIGTERM while its loop's handler is installed, then returns `code_after_signal` (75: it
    saved a checkpoint; 0: the signal came at its last step, which finished the run)."""
    runs: list = []

    def run_recipe(cfg) -> int:
        runs.append(cfg)
        if int(Path(cfg.output_dir).name.removeprefix("job")) != signal_in_job:
            return 0
        with PreemptionHandler() as preemption:
            signal.raise_signal(signal.SIGTERM)
            assert preemption.requested == signal.SIGTERM
        return code_after_signal

    module = types.ModuleType("finetune.train.run")
    module.run_recipe = run_recipe
    monkeypatch.setitem(sys.modules, "finetune.train.run", module)
    return runs


@pytest.mark.parametrize("code_after_signal", [PREEMPTED_EXIT_CODE, 0])
def test_a_signal_stops_the_sweep(cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  code_after_signal: int) -> None:
    monkeypatch.chdir(tmp_path)
    runs = _fake_runs(monkeypatch, signal_in_job=1, code_after_signal=code_after_signal)
    result = cli("run", "lora_sft", "-m", "peft.r=2,4,8,16", f"output_dir={tmp_path / 'sw'}")
    assert [cfg.peft.r for cfg in runs] == [2, 4]
    assert result.code == PREEMPTED_EXIT_CODE
    states = [line.rsplit(": ", 1)[1] for line in result.out.splitlines()
              if line.startswith("[sweep job") and "->" not in line]
    assert states == ["done", "preempted (75)" if code_after_signal else "done",
                      "not started", "not started"]
    assert "sweep stopped by a signal during job 1" in result.err
    assert "resume=auto" in result.err


def test_resume_auto_keeps_finished_jobs_and_runs_the_rest(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sw"
    finished = sweep / "job0"
    (finished / "final").mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    (sweep / "job1" / "checkpoints").mkdir(parents=True)  # stopped: no summary yet
    runs = _fake_runs(monkeypatch, signal_in_job=None, code_after_signal=0)
    result = cli("run", "lora_sft", "-m", "peft.r=2,4,8", f"output_dir={sweep}",
                 "resume=auto")
    assert result.code == 0, result.err
    assert [(cfg.peft.r, cfg.resume) for cfg in runs] == [(4, "auto"), (8, "auto")]
    assert "[sweep job 0] peft.r=2,resume=auto: already done" in result.out
    assert (finished / "summary.json").read_text() == "{}"


def test_a_new_sweep_starts_every_job_after_a_stopped_one(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_runs(monkeypatch, signal_in_job=0, code_after_signal=PREEMPTED_EXIT_CODE)
    assert cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'a'}").code == 75
    runs = _fake_runs(monkeypatch, signal_in_job=None, code_after_signal=0)
    assert cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'b'}").code == 0
    assert [cfg.peft.r for cfg in runs] == [2, 4]


def test_a_sweep_into_a_folder_in_use_is_refused(cli: Cli, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    runs = _fake_runs(monkeypatch, signal_in_job=None, code_after_signal=0)
    with RunDirLock(tmp_path / "sw"):
        result = cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'sw'}")
        assert result.code == 2
        assert f"is in use by another run: PID {os.getpid()}" in result.err
        assert runs == [] and [p.name for p in (tmp_path / "sw").iterdir()] == [LOCK_NAME]
