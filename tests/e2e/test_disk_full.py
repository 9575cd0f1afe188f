"""A sharded (fsdp2) run on a small disk: the space check before a save counts what every
rank's shards write, so the save that cannot fit stops before writing, in one paragraph (exit
code 1) on every rank, and the earlier checkpoint stays intact.

A 14 MB tmpfs holds one checkpoint of the tiny LoRA run (about 7.7 MB, written by two ranks),
not two; skipped where a tmpfs cannot be mounted (the in-process ENOSPC tests in
unit/train/test_save_space.py cover the rest)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from finetune.checkpoint.files import verify_manifest
from tests._cli import run_cli


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (the in-process ENOSPC tests cover it)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_sharded_save_that_cannot_fit_stops_before_writing(small_disk: Path) -> None:
    run_dir = small_disk / "run"
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
