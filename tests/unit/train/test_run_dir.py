"""The run directory: writability, restoring a fresh directory after an early failure,
abandoned trajectories, and disk-full saves."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from finetune.checkpoint import store
from finetune.checkpoint.files import verify_manifest
from finetune.errors import DiskFullError, OutputDirError
from finetune.train.run_dir import FreshRunDir, check_output_dir, start_run_files


def _step_folder(run: Path, step: int, complete: bool = True) -> Path:
    folder = store.checkpoints_root(run) / store.step_dir_name(step)
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if complete:
        (folder / "manifest.json").write_text("{}")
    return folder


def test_check_output_dir_leaves_no_trace_and_refuses_unwritable(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "run"
    check_output_dir(target, None)
    assert not (tmp_path / "a").exists()
    with pytest.raises(OutputDirError, match="cannot be written"):
        check_output_dir(Path("/proc/finetune-run"), None)


def test_fresh_run_dir_is_restored_but_a_resumed_one_is_not(tmp_path: Path) -> None:
    new = tmp_path / "new"
    claim = FreshRunDir(new, None)
    new.mkdir()
    (new / "config.yaml").write_text("x")
    claim.restore()
    assert not new.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    claim = FreshRunDir(empty, None)
    (empty / "metrics.jsonl").write_text("x")
    (empty / "checkpoints").mkdir()
    claim.restore()
    assert empty.is_dir() and not any(empty.iterdir())

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("{}\n")
    FreshRunDir(old, "auto").restore()
    assert (old / "metrics.jsonl").is_file()


def test_resume_sets_later_checkpoints_aside(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        _step_folder(tmp_path, step, complete)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    complete = start_run_files(tmp_path, 2, config_yaml="a: 1\n", kernel_plan={"k": 1})
    assert complete
    assert [s for s, _ in store.list_checkpoints(tmp_path)] == [2]
    aside = next(store.checkpoints_root(tmp_path).glob("abandoned-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000004", "step_0000006"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [1, 2]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_lost_metrics_history_is_reported(tmp_path: Path) -> None:
    assert not start_run_files(tmp_path, 4, config_yaml="", kernel_plan={})
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert start_run_files(fresh, 0, config_yaml="", kernel_plan={})


def test_a_save_over_an_existing_step_folder_writes_its_step(tmp_path: Path) -> None:
    stale = _step_folder(tmp_path, 4, complete=False)
    tmp = store.prepare_tmp(tmp_path, 4)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 4, "new": True}))
    final = store.finish_checkpoint(tmp_path, 4)
    assert final == stale
    assert json.loads((final / "trainer_state.json").read_text())["new"] is True
    assert verify_manifest(final) is None
    aside = next(store.checkpoints_root(tmp_path).glob("abandoned-*"))
    assert (aside / "step_0000004" / "trainer_state.json").is_file()


def test_free_space_is_checked_before_a_save(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**7, 9 * 10**6, 10**6))
    with pytest.raises(DiskFullError) as info:
        store.check_free_space(tmp_path, 5 * 10**6, "checkpoint step 4")
    message = str(info.value)
    assert str(tmp_path) in message and "5.0 MB" in message and "1.0 MB are free" in message
    store.check_free_space(tmp_path, 10**5, "checkpoint step 4")


def test_disk_full_is_recognised_through_chained_errors() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert store.is_disk_full(full)
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("unexpected pos 123") from exc
    except RuntimeError as wrapped:
        assert store.is_disk_full(wrapped)
    assert not store.is_disk_full(OSError(errno.EACCES, "denied"))
    assert not store.is_disk_full(ValueError("bad"))
