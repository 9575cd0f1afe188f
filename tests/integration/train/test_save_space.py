"""A checkpoint's size is known before it is written, and running out of space while writing
(a replicated or a sharded save) stops every rank with one DiskFullError, the temporary folder
removed and earlier checkpoints intact."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch.distributed as dist

from finetune.checkpoint import store
from finetune.checkpoint.files import verify_manifest
from finetune.errors import DiskFullError

_DCP_LOGGER = "c10d-NullHandler-dcp_logger"  # torch.distributed.checkpoint's logger


@pytest.fixture
def own_process_group():
    """fsdp2 on one process makes a one-rank process group; removed after the test."""
    owned = not dist.is_initialized()
    yield
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def _estimates(monkeypatch) -> list[int]:
    """The bytes each save checks for, in order."""
    seen: list[int] = []
    check = store.check_free_space

    def record(directory, needed, what, **free):
        seen.append(needed)
        return check(directory, needed, what, **free)

    monkeypatch.setattr(store, "check_free_space", record)
    return seen


@pytest.mark.parametrize("engine", ["single", "fsdp2"])
def test_a_save_is_estimated_and_enospc_while_writing_is_one_disk_full_error(
        make_trainer, tmp_path: Path, monkeypatch, engine: str, own_process_group) -> None:
    from torch.distributed.checkpoint import filesystem

    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=2", engine=engine)
    trainer.fit()
    seen = _estimates(monkeypatch)
    first = trainer.save_checkpoint()
    written = store.checkpoint_bytes(first)
    assert seen and written <= seen[0] <= 1.5 * written + 2**20, (seen, written)

    trainer.state.step += 1  # a later step to save

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if engine == "fsdp2":  # inside torch.distributed.checkpoint's writer
        monkeypatch.setattr(filesystem, "_write_item", full)
    else:
        monkeypatch.setattr(store, "save_file", full)
    # What reaches the loggers a rank log listens to (DCP's own logs every rank's traceback).
    records: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = records.append
    dcp_logger = logging.getLogger(_DCP_LOGGER)
    dcp_logger.addHandler(catch)
    try:
        with pytest.raises(DiskFullError) as info:
            trainer.save_checkpoint()
    finally:
        dcp_logger.removeHandler(catch)
    trainer.close()
    assert not [r for r in records if "Traceback" in r.getMessage()]
    message = str(info.value)
    assert "not enough disk space to write checkpoint step 3" in message
    assert "MB are free" in message and "Traceback" not in message
    root = store.checkpoints_root(tmp_path / "run")
    assert not list(root.glob(".tmp-*"))
    assert verify_manifest(first) is None
    assert [s for s, _ in store.list_checkpoints(tmp_path / "run")] == [2]
