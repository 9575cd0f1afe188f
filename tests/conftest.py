"""Shared fixtures: an isolated cache per session so tests never touch the user's ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Set before any test module imports huggingface_hub or wandb, which read them at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("finetune-cache")
    os.environ["FINETUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(_isolated_cache: Path) -> Path:
    from finetune.models.tiny import ensure_tiny_model

    return ensure_tiny_model()
