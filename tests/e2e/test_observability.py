"""What a run shows and leaves behind, as a user sees it: metrics.jsonl fields, report.png,
TensorBoard event files, `finetune report` on two runs, W&B offline and resumed, the live
display on a terminal, and a sweep's lines printed once each."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._cli import QUICK, REPO, read_step_metrics, run_cli

FAST = [*QUICK, "trainer.max_steps=3", "trainer.eval_every_n_steps=3"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two short runs that differ in optim.lr; the first also logs to TensorBoard."""
    root = tmp_path_factory.mktemp("observability")
    first, second = root / "lr1", root / "lr2"
    result = run_cli("run", "lora_sft", *FAST, "optim.lr=1e-3", "logger=tensorboard",
                     f"output_dir={first}")
    assert result.returncode == 0, result.stderr[-3000:]
    other = run_cli("run", "lora_sft", *FAST, "optim.lr=2e-3", f"output_dir={second}")
    assert other.returncode == 0, other.stderr[-3000:]
    return first, second, result.stdout


def test_metrics_rows_carry_every_field(two_runs) -> None:
    first, _, _ = two_runs
    steps = read_step_metrics(first)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s",
                "step_time_s", "mfu", "epoch", "data_wait_s", "peak_mem_gb"} <= set(row)
        assert row["peak_mem_gb"] > 0 and row["tokens_per_s"] > 0
        assert row["mfu"] is None  # a CPU has no tabulated peak: unknown, not guessed
    summary = json.loads((first / "summary.json").read_text())
    assert summary["mean_tokens_per_s"] > 0 and summary["peak_memory_gb"] > 0


def test_the_end_summary_and_report_png(two_runs) -> None:
    first, _, stdout = two_runs
    assert (first / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tail = stdout[stdout.index("done."):]
    for needle in ("  loss: ", "  eval loss: ", "  throughput: ", "MFU unknown",
                   "  peak memory: ", f"  outputs: {first} (", "report.png", "tb",
                   f"  final model: {first / 'final'}"):
        assert needle in tail, needle


def test_tensorboard_events_in_the_run_dir(two_runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, _, _ = two_runs
    events = EventAccumulator(str(first / "tb"))
    events.Reload()
    losses = [r["loss"] for r in read_step_metrics(first)]
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(v, 5) for v in losses]
    assert [e.step for e in events.Scalars("eval_loss")] == [3]


def test_report_compares_the_two_runs(two_runs, tmp_path: Path) -> None:
    first, second, _ = two_runs
    plot = tmp_path / "losses.png"
    result = run_cli("report", str(first), str(second), "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "optim.lr" in result.stdout and "lr1" in result.stdout and "lr2" in result.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(run_cli("report", str(first), str(second), "--json").stdout)
    assert data["config_differences"] == ["logger.tensorboard", "optim.lr"]
    assert [run["config"]["optim.lr"] for run in data["runs"]] == [1e-3, 2e-3]
    assert all(run["completed"] and run["tokens_per_s"] > 0 for run in data["runs"])


def test_wandb_without_a_key_runs_offline_and_resumes_the_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"),
           "HOME": str(tmp_path / "home")}  # no key anywhere; the mode comes from the config
    first = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=2",
                    "trainer.save_every_n_steps=1", "logger=wandb", f"output_dir={run_dir}",
                    env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("no W&B API key") == 1 and "wandb sync " in first.stderr
    state = json.loads((run_dir / "checkpoints/step_0000002/trainer_state.json").read_text())
    run_id = state["wandb_run_id"]
    assert run_id
    again = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=3",
                    "trainer.save_every_n_steps=1", "logger=wandb", "resume=auto",
                    f"output_dir={run_dir}", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)


def test_a_sweep_prints_each_line_once(tmp_path: Path) -> None:
    """Hydra's multirun neither repeats our log lines nor swallows them."""
    result = run_cli("run", "lora_sft", "-m", "optim.lr=1e-3,2e-3", "trainer.max_steps=2",
                     *QUICK[1:], f"output_dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done.") == 2
    assert result.stdout.count("step 2/2 |") == 2
    assert result.stderr.count("finetune.models.load: loaded tiny") == 2
    assert result.stderr.count("finetune.data.in_memory: data:") == 2


def _run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run the CLI with its output on a pseudo-terminal, as in an interactive shell."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "140", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", *args], cwd=REPO,
                            stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_the_live_display(tmp_path: Path) -> None:
    code, screen = _run_in_terminal(["run", "lora_sft", *FAST, f"output_dir={tmp_path / 'run'}"])
    assert code == 0, screen[-3000:]
    assert "step 3/3" in screen and "eta" in screen and "tok/s" in screen
    assert " | loss " not in screen  # no plain lines on a terminal
    assert "done." in screen and "throughput" in screen
