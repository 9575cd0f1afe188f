"""Fixtures for the model-loading tests: model configs and edited copies of the tiny folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cfg() -> Callable[..., object]:
    """model_cfg(name_or_path, **fields): the `model` group as a run gets it (OmegaConf-checked)."""
    from omegaconf import OmegaConf

    from finetune.config.schema import ModelConfig

    return lambda name_or_path, **fields: OmegaConf.to_object(OmegaConf.merge(
        OmegaConf.structured(ModelConfig), {"name_or_path": str(name_or_path), **fields}))


@pytest.fixture
def tiny_copy(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """tiny_copy(name, config=..., tokenizer_config=...): a copy of the tiny model folder whose
    config.json / tokenizer_config.json get the given keys (a value of None removes the key)."""

    def copy(name: str, config: dict | None = None,
             tokenizer_config: dict | None = None) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        for file, changes in (("config.json", config), ("tokenizer_config.json",
                                                         tokenizer_config)):
            data = json.loads((folder / file).read_text(encoding="utf-8"))
            for key, value in (changes or {}).items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            (folder / file).write_text(json.dumps(data), encoding="utf-8")
        return folder

    return copy
