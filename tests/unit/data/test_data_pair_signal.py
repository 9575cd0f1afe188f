"""Preference pairs whose chosen and rejected answers are the same teach DPO nothing (a gradient
of exactly 0): they are left out, counted as skipped with a warning that names where they are,
and data where no pair is left is refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from finetune.data import DataError, build_data
from finetune.data import preference as preference_module
from finetune.data.length import LengthChoice


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"{i}.", "rejected": f"No, {i + 1}."}
            for i in range(n)]


def _build(tokenizer, cfg, **kwargs):
    return build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2, pairs=True,
                      **kwargs)


def test_identical_pairs_are_left_out_counted_and_named(tokenizer, data_cfg, jsonl, caplog):
    rows = _pairs(10)
    for i in (2, 6):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = jsonl(rows)
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        data = _build(tokenizer, data_cfg(path=str(path), shuffle=False))
    assert data.num_pairs == 8
    assert data.stats.skip_reasons == {"identical_pair": 2} and data.stats.skipped_rows == 2
    assert data.stats.rows_read == 10
    assert "2 of 10 pairs" in caplog.text
    assert f"{path}:3" in caplog.text and f"{path}:7" in caplog.text
    rows_ = data.train.rows
    for i in range(data.num_pairs):  # no pair left has the same two sequences
        assert not np.array_equal(rows_.example(2 * i)[0], rows_.example(2 * i + 1)[0])
    # The cached pairs give the same counts and the same warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.data"):
        again = _build(tokenizer, data_cfg(path=str(path), shuffle=False))
    assert again.stats.sources[0]["from_cache"] and again.stats.skip_reasons == {
        "identical_pair": 2}
    assert f"{path}:3" in caplog.text


@pytest.mark.parametrize("answer", ["The same answer.", ""])
def test_no_pair_with_a_signal_is_refused(tokenizer, data_cfg, jsonl, answer: str):
    rows = [{"prompt": f"Question {i}?", "chosen": answer, "rejected": answer} for i in range(6)]
    path = jsonl(rows)
    with pytest.raises(DataError) as err:
        _build(tokenizer, data_cfg(path=str(path)))
    text = str(err.value)
    assert "no preference pair" in text and "6 of the 6 pairs" in text
    assert f"{path}:1" in text and "gradient of exactly 0" in text


def test_pairs_identical_once_cut_are_left_out(tokenizer, data_cfg, jsonl, monkeypatch):
    rows = _pairs(10)
    shared = " ".join(f"w{k}" for k in range(60))
    rows[4]["chosen"], rows[4]["rejected"] = shared + " yes", shared + " no"
    monkeypatch.setattr(preference_module, "choose_max_seq_len",
                        lambda lengths, cap, truncation: LengthChoice(24, "auto: test"))
    data = _build(tokenizer, data_cfg(path=str(jsonl(rows)), max_seq_len="auto"),
                  max_context=4096)
    assert data.num_pairs == 9 and data.stats.skip_reasons == {"identical_pair": 1}
    assert data.stats.truncated_rows == 0
