"""Checkpoint files: manifest completeness, corruption, retention, RNG round trip, safety."""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.checkpoint import store
from finetune.checkpoint.compat import check_resume_compatible
from finetune.errors import CheckpointError


def _state(step: int) -> store.TrainerState:
    param = torch.nn.Parameter(torch.full((3,), float(step)))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return store.TrainerState(
        trainable={"w": param.detach()}, optimizer=opt.state_dict(),
        scheduler={"last_epoch": step}, scaler=None,
        progress={"step": step, "data": {"position": 8}})


def _save(run: Path, step: int, weights_of: int | None = None) -> Path:
    tmp = store.prepare_tmp(run, step)
    store.write_state(tmp, _state(weights_of or step), config_yaml="seed: 1\n",
                      kernel_plan={"kernels": {}})
    store.write_rank_rng(tmp, 0)
    return store.finish_checkpoint(run, step)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = _save(tmp_path, 5)
    assert path.name == "step_0000005"
    loaded = store.load_checkpoint(path)
    assert torch.equal(loaded.state.trainable["w"], _state(5).trainable["w"])
    assert loaded.state.progress == {"step": 5, "data": {"position": 8}}
    assert loaded.state.optimizer["state"][0]["step"] == 1
    assert loaded.state.scheduler == {"last_epoch": 5} and loaded.state.scaler is None
    assert loaded.config_yaml == "seed: 1\n"


def test_every_ranks_rng_comes_back(tmp_path: Path) -> None:
    tmp = store.prepare_tmp(tmp_path, 1)
    store.write_state(tmp, _state(1), config_yaml="", kernel_plan={})
    torch.manual_seed(0)
    rank0 = store.capture_rng()
    torch.manual_seed(1)
    rank1 = store.capture_rng()
    store.write_rank_rng(tmp, 0, rank0)
    store.write_rank_rng(tmp, 1, rank1)
    rng = store.load_checkpoint(store.finish_checkpoint(tmp_path, 1)).state.rng
    assert sorted(rng) == [0, 1]
    for rank, (tensors, plain) in ((0, rank0), (1, rank1)):
        assert torch.equal(rng[rank][0]["torch"], tensors["torch"])
        assert rng[rank][1] == plain
    assert not torch.equal(rng[0][0]["torch"], rng[1][0]["torch"])


def test_latest_skips_incomplete_and_corrupt(tmp_path: Path, caplog) -> None:
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    third = _save(tmp_path, 3)
    (third / "manifest.json").unlink()  # killed before the manifest: incomplete
    weights = second / "trainable.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # bit rot in the next one: one byte flipped, same size
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert weights.stat().st_size == size  # only the sha256 can tell
    with caplog.at_level("WARNING"):
        latest = store.latest_complete_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_0000001"
    assert "step_0000003" in caplog.text and "step_0000002" in caplog.text
    with pytest.raises(CheckpointError, match="checksum"):
        store.load_checkpoint(second)


def test_tmp_leftover_is_never_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    tmp = store.prepare_tmp(tmp_path, 2)
    store.write_state(tmp, _state(2), config_yaml="", kernel_plan={})  # crash: no manifest
    assert store.latest_complete_checkpoint(tmp_path).name == "step_0000001"
    store.remove_stale_tmp(tmp_path)
    assert not tmp.exists()


def test_a_finished_checkpoint_is_set_aside_never_overwritten(tmp_path: Path) -> None:
    """A second save of the same step belongs to another trajectory: the first one is moved,
    intact and still verifiable, into checkpoints/abandoned-<time>/."""
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 1, weights_of=9)
    assert second == first
    assert torch.equal(store.load_checkpoint(second).state.trainable["w"],
                       _state(9).trainable["w"])
    [aside] = (tmp_path / "checkpoints").glob("abandoned-*/step_0000001")
    assert torch.equal(store.load_checkpoint(aside).state.trainable["w"],
                       _state(1).trainable["w"])
    assert [s for s, _ in store.list_checkpoints(tmp_path)] == [1]  # not a resume candidate


def test_resume_sets_later_checkpoints_aside(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "checkpoints/step_0000003/manifest.json").unlink()  # incomplete ones too
    target = store.abandon_after(tmp_path, 1)
    assert sorted(p.name for p in target.iterdir()) == ["step_0000002", "step_0000003"]
    assert store.load_checkpoint(target / "step_0000002").state.progress["step"] == 2
    assert [s for s, _ in store.list_checkpoints(tmp_path)] == [1]
    assert store.abandon_after(tmp_path, 1) is None  # nothing later: no empty folder made
    assert len(list((tmp_path / "checkpoints").glob("abandoned-*"))) == 1


def test_missing_file_or_directory_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    (path / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match="scheduler.pt is missing"):
        store.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="resume=auto"):
        store.load_checkpoint(tmp_path / "checkpoints" / "step_0000099")


def test_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    removed = store.apply_retention(tmp_path, keep_last_n=2, best_step=2)
    left = [p.name for _, p in store.list_checkpoints(tmp_path)]
    assert left == ["step_0000002", "step_0000004", "step_0000005"]
    assert len(removed) == 2


def test_retention_never_deletes_an_incomplete_checkpoint(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert store.apply_retention(tmp_path, keep_last_n=0) == []  # 0 keeps all
    (tmp_path / "checkpoints/step_0000001/manifest.json").unlink()
    removed = store.apply_retention(tmp_path, keep_last_n=1)
    assert [p.name for p in removed] == ["step_0000002"]
    left = [p.name for _, p in store.list_checkpoints(tmp_path)]
    assert left == ["step_0000001", "step_0000003"]


def test_rng_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    store.write_rank_rng(tmp_path, 0)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    store.restore_rng(*store.read_rank_rng(tmp_path, 0))
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    """A checkpoint whose optimizer file holds arbitrary objects is not unpickled."""
    path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"state": Evil()}, path / "optimizer.pt")
    from finetune.checkpoint.files import write_manifest

    (path / "manifest.json").unlink()
    write_manifest(path, {"step": 1})
    with pytest.raises(CheckpointError, match="could not be read"):
        store.load_checkpoint(path)


def test_resume_config_changes() -> None:
    saved = "seed: 1\ntrainer:\n  max_steps: 10\nmodel:\n  name_or_path: tiny\n"
    allowed, forced = check_resume_compatible(  # how the run was started is no change
        saved, {"seed": 1, "trainer": {"max_steps": 20}, "model": {"name_or_path": "tiny"},
                "output_dir": "/elsewhere", "resume": "auto", "resume_force": False},
        force=False, checkpoint="c")
    assert allowed == ["trainer.max_steps: 10 -> 20"] and forced == []
    changed = {"seed": 2, "trainer": {"max_steps": 10}, "model": {"name_or_path": "other"}}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(saved, changed, force=False, checkpoint="c")
    assert "seed: 1 -> 2" in str(info.value) and "model.name_or_path" in str(info.value)
    _, forced = check_resume_compatible(saved, changed, force=True, checkpoint="c")
    assert len(forced) == 2


@pytest.mark.parametrize(("exc", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("safetensors write failed"), False),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     True),
])
def test_disk_full_is_recognised_through_wrapping_errors(exc: BaseException, full: bool) -> None:
    assert store.is_disk_full(exc) is full
    try:  # a library that re-raises its own error keeps the OSError as the cause
        raise RuntimeError("write failed") from exc
    except RuntimeError as wrapped:
        assert store.is_disk_full(wrapped) is full


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch) -> None:
    from finetune.errors import DiskFullError

    usage = shutil.disk_usage(tmp_path)._replace(free=10_000_000)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _path: usage)
    store.check_free_space(tmp_path, 9_000_000, "checkpoint step 3")
    with pytest.raises(DiskFullError) as info:
        store.check_free_space(tmp_path, 50_000_000, "checkpoint step 3")
    message = str(info.value)
    assert str(tmp_path) in message and "50.0 MB" in message and "10.0 MB" in message
    assert "resume=auto" in message


def test_state_bytes_counts_every_tensor() -> None:
    state = store.TrainerState(
        trainable={"a": torch.zeros(10)},  # 40 bytes
        optimizer={"state": {0: {"m": torch.zeros(5, dtype=torch.bfloat16)}},  # 10 bytes
                   "param_groups": [{"lr": 0.1}]},
        scheduler={"last_epoch": 3}, scaler={"scale": torch.tensor(2.0 ** 16)},  # 4 bytes
        progress={"step": 3}, rng={1: ({"torch": torch.zeros(8, dtype=torch.uint8)}, {})})
    per_tensor, per_rank = store.TENSOR_OVERHEAD, store.RANK_OVERHEAD
    # The main rank writes the whole tensors, its RNG and the small files (JSON, config, plan).
    assert store.state_bytes(state) == (54 + 8 + 4 * per_tensor + per_rank
                                        + store.FIXED_OVERHEAD)
    # Another rank of a replicated run writes only its RNG files.
    assert store.state_bytes(state, main=False) == 8 + per_tensor + per_rank
