"""Runs on a small disk (a tmpfs; skipped where one cannot be mounted, the in-process ENOSPC
tests in integration/train/test_save_space.py and unit/adapters/test_export_writes.py cover the rest).

A sharded (fsdp2) run: the space check before a save counts what every rank's shards write, so
the save that cannot fit stops before writing, in one paragraph (exit code 1) on every rank, and
the earlier checkpoint stays intact. A 14 MB tmpfs holds one checkpoint of the tiny LoRA run
(about 7.7 MB, written by two ranks), not two.

A run whose final/ does not fit (1 MB): one paragraph, exit code 1, no `.final-*` left."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from finetune.checkpoint.files import verify_manifest
from finetune.checkpoint.store import checkpoint_bytes
from tests._cli import run_cli


@pytest.fixture
def small_disk(tmp_path: Path):
    """small_disk(megabytes) -> the folder of a tmpfs that size, unmounted after the test."""
    mounts = []

    def mount(megabytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                               str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (the in-process ENOSPC tests cover it)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_sharded_save_that_cannot_fit_stops_before_writing(small_disk) -> None:
    run_dir = small_disk(14) / "run"
    result = run_cli("run", "lora_sft", "distributed=fsdp2", "--nproc", "2",
                     "trainer.max_steps=4", "trainer.save_every_n_steps=2",
                     "trainer.micro_batch_size=4", "data.max_seq_len=64",
                     "trainer.eval_every_n_steps=0", "logger.display=plain",
                     f"output_dir={run_dir}")
    assert result.returncode == 1, result.stderr[-3000:]
    message = "not enough disk space to write checkpoint step 4 in"
    assert message in result.stderr and "MB are free" in result.stderr
    assert "CheckpointException" not in result.stderr and "Errno 28" not in result.stderr
    for rank in (0, 1):  # each rank ended on the same paragraph, with no traceback
        log = (run_dir / f"logs/rank_{rank}.log").read_text(encoding="utf-8")
        assert message in log and "Traceback" not in log, log[-2000:]
    root = run_dir / "checkpoints"
    assert not list(root.glob(".tmp-*"))
    assert [p.name for p in root.glob("step_*")] == ["step_0000002"]
    assert verify_manifest(root / "step_0000002") is None
    # The estimate for step 4 against what the two ranks wrote for step 2 (the same sizes).
    needed = float(re.search(r"it needs about ([\d.]+) MB", result.stderr).group(1)) * 1e6
    written = checkpoint_bytes(root / "step_0000002")
    assert written <= needed <= 1.5 * written, (needed, written)


def test_a_final_model_that_cannot_fit_is_one_paragraph(small_disk) -> None:
    run_dir = small_disk(1) / "run"
    result = run_cli("run", "lora_sft", "trainer.max_steps=1", "trainer.save_every_n_steps=0",
                     "trainer.micro_batch_size=4", "data.max_seq_len=64",
                     "trainer.eval_every_n_steps=0", "logger.display=plain",
                     f"output_dir={run_dir}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"not enough disk space to write final/ in {run_dir}" in result.stderr
    assert "MB are free" in result.stderr and "Traceback" not in result.stderr
    assert not list(run_dir.glob(".final-*")) and not (run_dir / "final").exists()
