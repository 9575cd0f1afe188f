"""Runs that go wrong: NaN losses, and the wheel installed without the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._cli import QUICK, REPO, read_step_metrics, run_cli


def test_nan_stop_names_the_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", *QUICK, "optim.lr=1e30", "optim.warmup_steps=0",
                     "trainer.max_grad_norm=0", "trainer.save_every_n_steps=1",
                     f"output_dir={run_dir}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite loss" in result.stderr and "at step" in result.stderr
    assert "Traceback" not in result.stderr
    steps = read_step_metrics(run_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints, "the finite steps before the NaN were checkpointed"
    assert all((c / "manifest.json").is_file() for c in checkpoints)
    assert len(checkpoints) == len(steps)  # nothing saved for the NaN step
    assert not (run_dir / "final").exists()


def test_nan_skip_counts_skipped_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", *QUICK, "optim.lr=1e30", "optim.warmup_steps=0",
                     "trainer.max_grad_norm=0", "trainer.on_nan=skip", "trainer.max_steps=4",
                     f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    skipped = [r for r in read_step_metrics(run_dir) if r.get("skipped_non_finite")]
    assert summary["nan_skipped_steps"] == len(skipped) > 0


def test_wheel_works_outside_the_source_tree(tmp_path: Path) -> None:
    """configs/ and recipes/ ship inside the wheel: a non-editable install works anywhere."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("finetune-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import finetune, sys; from finetune.cli import main; "
            "assert 'site' in finetune.__file__, finetune.__file__; "
            "sys.exit(main(['validate', 'lora_sft', 'data=bundled']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recipe: lora_sft" in result.stdout
    listing = subprocess.run([sys.executable, "-c", "from finetune.cli import main; main(['ls'])"],
                             cwd=elsewhere, env=env, capture_output=True, text=True)
    assert "lora_sft" in listing.stdout and "trainer/" in listing.stdout
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune/data/bundled/instructions.jsonl" in names
    assert "finetune/models/tiny_tokenizer.json" in names


def test_wandb_offline_and_no_secrets_written(tmp_path: Path) -> None:
    """logger=wandb works offline; API keys and tokens from the environment land nowhere."""
    run_dir = tmp_path / "run"
    secrets = {"WANDB_API_KEY": "wandb-secret-4f1c9a", "HF_TOKEN": "hf-secret-77d2b0"}
    result = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=2", "logger=wandb",
                     "logger.mode=offline", "trainer.save_every_n_steps=1",
                     f"output_dir={run_dir}", env={**secrets, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(run_dir.glob("wandb/offline-run-*")), "the W&B offline run was written"
    state = json.loads((run_dir / "checkpoints/step_0000002/trainer_state.json").read_text())
    assert state["wandb_run_id"]
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in secrets.values():
                assert value.encode() not in data, f"{value} written to {path}"
    assert all(v not in result.stdout + result.stderr for v in secrets.values())
