"""Held-out data that is also training data is refused: its loss would not be held out."""

from __future__ import annotations

import os

import pytest

from finetune.data import DataError, build_data


def _build(tokenizer, cfg, **kwargs):
    return build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2, **kwargs)


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "folder", "list"])
def test_val_path_reading_a_training_file_is_refused(tokenizer, data_cfg, jsonl, alpaca_rows,
                                                     tmp_path, monkeypatch, how: str) -> None:
    train = jsonl(alpaca_rows(8), "data/train.jsonl")
    other = jsonl(alpaca_rows(4, start=50), "data/other.jsonl")
    path, val = str(train), str(train)
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        val = "data/../data/train.jsonl"
    elif how == "symlink":
        os.symlink(train, tmp_path / "link.jsonl")
        val = str(tmp_path / "link.jsonl")
    elif how == "folder":
        path = str(train.parent)  # the folder holds the held-out file too
        val = str(other)
    elif how == "list":
        val = [str(other), str(train)]
    with pytest.raises(DataError) as err:
        _build(tokenizer, data_cfg(path=path, val_path=val, format="alpaca"))
    text = str(err.value)
    assert "data.val_path=" in text and "data.path=" in text and "data.val_split" in text
    assert "held-out loss" in text


def test_separate_held_out_file_is_accepted(tokenizer, data_cfg, jsonl, alpaca_rows) -> None:
    train = jsonl(alpaca_rows(8), "train.jsonl")
    val = jsonl(alpaca_rows(4, start=50), "val.jsonl")
    data = _build(tokenizer, data_cfg(path=str(train), val_path=str(val), format="alpaca"))
    assert data.stats.val_rows == 4


def test_evaluation_may_read_the_training_file(tokenizer, data_cfg, jsonl, alpaca_rows) -> None:
    train = jsonl(alpaca_rows(8), "train.jsonl")
    data = _build(tokenizer, data_cfg(path=str(train), val_path=str(train), format="alpaca"),
                  held_out_apart=False)
    assert data.stats.val_rows == 8
