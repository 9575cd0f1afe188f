"""A checkpoint's folders and files get the umask's permissions (safetensors alone would write
its files 0600), so whoever may read the run can evaluate or merge its checkpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from finetune.checkpoint import store


def test_a_checkpoint_is_readable_by_others_under_umask_022(tmp_path: Path) -> None:
    state = store.TrainerState(trainable={"w": torch.ones(3)}, optimizer={"state": {}},
                               scheduler={"last_epoch": 1}, scaler=None, progress={"step": 1})
    previous = os.umask(0o022)
    try:
        tmp = store.prepare_tmp(tmp_path, 1)
        store.write_state(tmp, state, config_yaml="seed: 1\n", kernel_plan={})
        store.write_rank_rng(tmp, 0)
        final = store.finish_checkpoint(tmp_path, 1)
    finally:
        os.umask(previous)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [final, *final.rglob("*")]}
    assert modes.pop(final.name) == "0o755"
    assert "trainable.safetensors" in modes and "rng_rank0.safetensors" in modes
    assert set(modes.values()) == {"0o644"}, modes
