"""Faults that used to lose or corrupt a run's work, reproduced as a user would hit them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from finetune.checkpoint.files import verify_manifest
from tests._cli import QUICK, read_step_metrics, run_cli

SMALL = [*QUICK, "trainer.micro_batch_size=2", "data.max_seq_len=48"]


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("run", "lora_sft", *SMALL, f"output_dir={run_dir}", *extra)


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_resume_from_an_earlier_step_sets_later_checkpoints_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "x"
    first = _run(run_dir, "trainer.max_steps=6", "trainer.save_every_n_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    old_step6 = (run_dir / "checkpoints/step_0000006/trainable.safetensors").read_bytes()
    (run_dir / "checkpoints/step_0000006/manifest.json").unlink()  # and one of them is corrupt

    # Another learning rate from step 3 on, so the new trajectory's weights differ (a longer
    # schedule alone does not change steps 3-6: they are warmup steps).
    second = _run(run_dir, "trainer.max_steps=12", "trainer.save_every_n_steps=2",
                  "optim.lr=1e-3", f"resume={run_dir}/checkpoints/step_0000002")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "abandoned trajectory" in second.stderr
    aside = list((run_dir / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["step_0000004", "step_0000006"]
    for step in (4, 6, 8, 10, 12):  # every save of the new trajectory was written, complete
        folder = run_dir / f"checkpoints/step_{step:07d}"
        assert verify_manifest(folder) is None, folder
        assert _config(folder / "config.yaml")["trainer"]["max_steps"] == 12
    new_step6 = (run_dir / "checkpoints/step_0000006/trainable.safetensors").read_bytes()
    assert new_step6 != old_step6
    steps = [r["step"] for r in read_step_metrics(run_dir)]
    assert steps == list(range(1, 13))


def test_fresh_start_with_resume_auto_writes_each_step_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert _run(run_dir, "trainer.max_steps=5", "trainer.save_every_n_steps=5").returncode == 0
    for folder in (run_dir / "checkpoints").iterdir():  # as if killed during the first save
        (folder / "manifest.json").unlink()
    again = _run(run_dir, "trainer.max_steps=8", "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in read_step_metrics(run_dir)] == list(range(1, 9))


def test_lost_metrics_history_is_reported(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert _run(run_dir, "trainer.max_steps=4", "trainer.save_every_n_steps=2").returncode == 0
    (run_dir / "metrics.jsonl").unlink()
    again = _run(run_dir, "trainer.max_steps=6", "trainer.save_every_n_steps=2", "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "metrics.jsonl holds 0 of the 4 steps" in again.stderr
    assert "partial history" in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss_history"] == "partial"


def test_failed_forced_resume_keeps_the_run_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert _run(run_dir, "trainer.max_steps=2", "trainer.save_every_n_steps=2",
                "peft.r=8").returncode == 0
    forced = _run(run_dir, "trainer.max_steps=4", "resume=auto", "peft.r=4", "resume_force=true")
    assert forced.returncode == 2, forced.stderr[-2000:]
    assert "adapter shape" in forced.stderr
    assert _config(run_dir / "config.yaml")["peft"]["r"] == 8


def test_a_run_that_fails_before_its_first_step_can_be_rerun(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "hi"}\n', encoding="utf-8")  # no output field
    run_dir = tmp_path / "run"
    failed = _run(run_dir, f"data.path={data}", "data.format=alpaca")
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert not run_dir.exists()
    data.write_text('{"instruction": "hi", "output": "hello"}\n' * 40, encoding="utf-8")
    fixed = _run(run_dir, f"data.path={data}", "data.format=alpaca", "trainer.max_steps=2")
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_unwritable_output_dir_is_refused_before_any_work() -> None:
    result = run_cli("run", "lora_sft", "output_dir=/proc/finetune-run")
    assert result.returncode == 2
    assert "cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (the in-process ENOSPC tests cover it)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_stops_with_one_paragraph_and_keeps_earlier_checkpoints(
        small_disk: Path) -> None:
    run_dir = small_disk / "run"
    result = _run(run_dir, "trainer.max_steps=6", "trainer.save_every_n_steps=2")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "not enough disk space" in result.stderr and str(run_dir) in result.stderr
    assert "MB are free" in result.stderr
    assert "Traceback" not in result.stderr
    complete = sorted((run_dir / "checkpoints").glob("step_*"))
    assert complete and all(verify_manifest(c) is None for c in complete)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_exits_2(nproc: str, tmp_path: Path) -> None:
    result = run_cli("run", "lora_sft", "--nproc", nproc, f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "--nproc" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_truncated_weights_name_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _run(tmp_path / "run", f"model.name_or_path={model}")
    assert result.returncode == 2
    assert "model.safetensors is damaged or incomplete" in result.stderr
    assert "download the model again" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.weight_decay=inf"])
def test_non_finite_numbers_exit_2(override: str, tmp_path: Path) -> None:
    result = _run(tmp_path / "run", override)
    assert result.returncode == 2
    assert "not a finite number" in result.stderr and "Traceback" not in result.stderr


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    recipe = tmp_path / "my_run.yaml"
    recipe.write_text("defaults:\n  - run_schema\nrecipe: lora_sft\n  bad: [1,\n")
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}, line 4, column 6" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_before_the_loop_exits_130_in_one_line(tmp_path: Path) -> None:
    import signal
    import sys

    from tests._cli import REPO

    # Ctrl-C as from a terminal: a shell starting a job in the background ignores SIGINT for
    # it, so the child restores the default.
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", "lora_sft",
                             f"output_dir={tmp_path / 'run'}"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    for line in proc.stdout:  # the plan is printed; the model and data are loaded next
        if line.startswith("finetune lora_sft: output_dir="):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a fresh run leaves nothing behind
