"""The run directory as users meet it: one writer at a time, and a start that fails (a tracker
that does not start) leaves it as found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests._cli import REPO, read_step_metrics, run_cli

pytestmark = pytest.mark.slow


def _wait_for_a_step(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text(encoding="utf-8").strip():
            return
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.5)
    pytest.fail("the first run logged no step in time")


def test_a_second_run_into_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "run", "lora_sft", "--nproc", "2",
         "trainer.max_steps=400", "trainer.save_every_n_steps=2", f"output_dir={run_dir}"],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        _wait_for_a_step(run_dir, first)
        fresh = run_cli("run", "lora_sft", "trainer.max_steps=6", "optim.lr=1e-5",
                        f"output_dir={run_dir}")
        resumed = run_cli("run", "lora_sft", "trainer.max_steps=6", "resume=auto",
                          f"output_dir={run_dir}")
        for refused in (fresh, resumed):
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert f"is in use by another run: PID {first.pid} on host" in refused.stderr
            assert "Traceback" not in refused.stderr
            assert refused.stderr.count("\n") == 1  # one paragraph
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-2000:]
    assert "Traceback" not in err  # torchrun, stopped by the launcher, ends quietly too
    steps = [record["step"] for record in read_step_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # each step once, from one writer
    assert not list((run_dir / "checkpoints").glob("abandoned-*"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    assert not (run_dir / ".finetune-run.lock").exists()


def test_a_tracker_that_fails_to_start_leaves_the_directory_as_found(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    failed = run_cli("run", "lora_sft", "logger=wandb", "trainer.max_steps=2",
                     f"output_dir={run_dir}", env={"WANDB_MODE": "not-a-mode"})
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "the tracker (wandb) did not start" in failed.stderr
    assert "not-a-mode" in failed.stderr and "logger=console" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not run_dir.exists()


def test_a_user_error_on_two_processes_is_one_paragraph_and_leaves_no_trace(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "missing.jsonl"
    failed = run_cli("run", "lora_sft", "--nproc", "2", f"data.path={missing}",
                     f"output_dir={run_dir}")
    assert failed.returncode == 2, failed.stderr[-3000:]  # the rank's own code, not torchrun's 1
    assert f"error: data file not found: {missing}" in failed.stderr
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr
    assert not run_dir.exists()
