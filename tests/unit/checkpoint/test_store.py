"""Checkpoint files: manifest completeness, corruption, retention, RNG round trip, safety."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.checkpoint import store
from finetune.checkpoint.compat import check_resume_compatible
from finetune.errors import CheckpointError


def _payload(step: int) -> store.CheckpointPayload:
    param = torch.nn.Parameter(torch.full((3,), float(step)))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    return store.CheckpointPayload(
        trainable={"w": param.detach()}, optimizer=opt.state_dict(),
        scheduler={"last_epoch": step}, scaler=None, state={"step": step, "data": {"position": 8}},
        config_yaml="seed: 1\n", kernel_plan={"kernels": {}})


def _save(run: Path, step: int) -> Path:
    tmp = store.prepare_tmp(run, step)
    store.write_payload(tmp, _payload(step))
    store.write_rank_rng(tmp, 0)
    return store.finish_checkpoint(run, step)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = _save(tmp_path, 5)
    assert path.name == "step_0000005"
    loaded = store.load_checkpoint(path)
    assert torch.equal(loaded.trainable["w"], _payload(5).trainable["w"])
    assert loaded.state["data"] == {"position": 8}
    assert loaded.optimizer["state"][0]["step"] == 1


def test_latest_skips_incomplete_and_corrupt(tmp_path: Path, caplog) -> None:
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    third = _save(tmp_path, 3)
    (third / "manifest.json").unlink()  # killed before the manifest: incomplete
    with open(second / "trainable.safetensors", "r+b") as f:  # bit rot in the next one
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with caplog.at_level("WARNING"):
        latest = store.latest_complete_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_0000001"
    assert "step_0000003" in caplog.text and "step_0000002" in caplog.text
    with pytest.raises(CheckpointError, match="checksum"):
        store.load_checkpoint(second)


def test_tmp_leftover_is_never_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    tmp = store.prepare_tmp(tmp_path, 2)
    store.write_payload(tmp, _payload(2))  # crash here: no manifest, no rename
    assert store.latest_complete_checkpoint(tmp_path).name == "step_0000001"
    store.remove_stale_tmp(tmp_path)
    assert not tmp.exists()


def test_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    removed = store.apply_retention(tmp_path, keep_last_n=2, best_step=2)
    left = [p.name for _, p in store.list_checkpoints(tmp_path)]
    assert left == ["step_0000002", "step_0000004", "step_0000005"]
    assert len(removed) == 2


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
    allowed, forced = check_resume_compatible(
        saved, {"seed": 1, "trainer": {"max_steps": 20}, "model": {"name_or_path": "tiny"}},
        force=False, checkpoint="c")
    assert allowed == ["trainer.max_steps: 10 -> 20"] and forced == []
    changed = {"seed": 2, "trainer": {"max_steps": 10}, "model": {"name_or_path": "other"}}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible(saved, changed, force=False, checkpoint="c")
    assert "seed: 1 -> 2" in str(info.value) and "model.name_or_path" in str(info.value)
    _, forced = check_resume_compatible(saved, changed, force=True, checkpoint="c")
    assert len(forced) == 2
