"""Fixtures for the data pipeline tests: the tiny tokenizer and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config.data import DataConfig


@pytest.fixture(scope="session")
def tokenizer():
    from finetune.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def jsonl(tmp_path: Path):
    """jsonl(rows, name="d.jsonl") writes one JSON object per line and returns the path."""

    def write(rows: list, name: str = "d.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def alpaca_rows():
    """alpaca_rows(n, start=0): distinct alpaca rows of different lengths."""

    def make(n: int, *, start: int = 0) -> list[dict]:
        return [{"instruction": f"Say the number {i}." + " please" * (i % 7),
                 "input": "" if i % 2 else f"n={i}", "output": f"The number is {i}."}
                for i in range(start, start + n)]

    return make


@pytest.fixture
def data_cfg(tmp_path: Path):
    """A DataConfig factory with a private cache folder, no held-out split and rows of at most
    512 tokens by default (data.max_seq_len=auto has tests of its own)."""

    def make(**kwargs) -> DataConfig:
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        kwargs.setdefault("max_seq_len", 512)
        kwargs.setdefault("val_split", 0.0)
        return DataConfig(**kwargs)

    return make
