"""data.max_seq_len=auto: the length chosen, and cutting rows after encoding equals encoding
with that length."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from finetune.data import DataError, build_data
from finetune.data import in_memory as in_memory_module
from finetune.data.length import LengthChoice, choose_max_seq_len, warn_if_many_cut
from finetune.data.tokenized import RowCounts


def _rows(n: int) -> list[dict]:
    """Mostly short rows, some long ones, and some whose long prompt leaves no answer when cut."""
    rows = []
    for i in range(n):
        if i % 10 == 3:
            rows.append({"instruction": "Tell me a long story. " + "word " * (40 + i % 13),
                         "output": f"Done {i}."})
        elif i % 10 == 7:
            rows.append({"instruction": f"Count {i}.", "output": " ".join(map(str, range(60)))})
        else:
            rows.append({"instruction": f"Say {i}.", "output": f"{i}."})
    return rows


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_cutting_after_encoding_equals_encoding_at_that_length(
        tokenizer, data_cfg, jsonl, monkeypatch, truncation: str) -> None:
    path = str(jsonl(_rows(60)))
    length = 40
    fixed = build_data(data_cfg(path=path, format="alpaca", max_seq_len=length,
                                truncation=truncation, shuffle=False),
                       tokenizer, attention="sdpa", seed=0, micro_batch_size=2)
    monkeypatch.setattr(in_memory_module, "choose_max_seq_len",
                        lambda lengths, cap, truncation: LengthChoice(length, "test"))
    auto = build_data(data_cfg(path=path, format="alpaca", max_seq_len="auto",
                               truncation=truncation, shuffle=False),
                      tokenizer, attention="sdpa", seed=0, micro_batch_size=2, max_context=4096)
    a, b = fixed.train.rows, auto.train.rows
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.tokens, b.tokens)
    assert np.array_equal(a.trained, b.trained)
    for key in ("truncated_rows", "dropped_rows", "rows"):
        assert getattr(fixed.stats, key) == getattr(auto.stats, key), key
    assert fixed.stats.truncated_rows + fixed.stats.dropped_rows > 0  # the case is exercised
    assert auto.stats.max_seq_len == length and auto.stats.max_seq_len_from == "test"


def test_auto_covers_99_percent_within_the_context() -> None:
    lengths = np.array([10] * 990 + [300] * 10)
    choice = choose_max_seq_len(lengths, cap=2048, truncation="truncate")
    assert choice.length == 64 and "99%" in choice.source
    assert choose_max_seq_len(np.array([10] * 980 + [300] * 20), 2048, "truncate").length == 320
    assert choose_max_seq_len(lengths, cap=2048, truncation="error").length == 320
    capped = choose_max_seq_len(np.array([5000] * 10), cap=2048, truncation="truncate")
    assert capped.length == 2048 and "model's context" in capped.source


def test_auto_run_keeps_all_but_at_most_one_percent_whole(tokenizer, data_cfg, jsonl) -> None:
    data = build_data(data_cfg(path=str(jsonl(_rows(200))), format="alpaca", max_seq_len="auto"),
                      tokenizer,
                      attention="sdpa", seed=0, micro_batch_size=2, max_context=2048)
    stats = data.stats
    assert stats.max_seq_len_from.startswith("auto")
    assert stats.truncated_rows + stats.dropped_rows <= 0.01 * stats.rows_read


def test_auto_with_streaming_asks_for_a_number(tokenizer, data_cfg, jsonl) -> None:
    cfg = data_cfg(path=str(jsonl(_rows(10))), streaming=True, max_seq_len="auto")
    with pytest.raises(DataError, match="data.max_seq_len=N"):
        build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2)


def test_many_cut_rows_warn_with_the_key_to_change(caplog) -> None:
    counts = RowCounts(read=100, truncated=3, dropped=1)
    with caplog.at_level(logging.WARNING, logger="finetune.data.length"):
        warn_if_many_cut(counts, 128, "data.max_seq_len")
    assert "4 of 100 rows" in caplog.text and "3 truncated, 1 dropped" in caplog.text
    assert "data.max_seq_len=auto" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.data.length"):
        warn_if_many_cut(RowCounts(read=1000, truncated=5), 128, "data.max_seq_len")
    assert not caplog.text
