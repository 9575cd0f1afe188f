"""What the truncation report counts: each row once (truncated or dropped, never both), pairs as
pairs, the length that applied, and a hint that never advises a length past the model's context.
"""

from __future__ import annotations

import logging
import re

import pytest

from finetune.data import DataError, build_data
from finetune.data import in_memory as in_memory_module
from finetune.data import preference as preference_module
from finetune.data.length import LengthChoice, warn_if_many_cut
from finetune.data.tokenized import RowCounts

LOGGER = "finetune.data.length"


def _rows(n: int) -> list[dict]:
    """A third of the rows have a prompt that fills 48 tokens (dropped when cut there), a third
    a long answer (truncated, kept), a third fit."""
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"instruction": "Tell a long story. " + "word " * 40, "output": f"{i}."})
        elif i % 3 == 1:
            rows.append({"instruction": f"Count {i}.", "output": " ".join(map(str, range(40)))})
        else:
            rows.append({"instruction": f"Say {i}.", "output": f"{i}."})
    return rows


def _reported(text: str) -> tuple[int, int, float, int, int]:
    """(cut, read, percent, truncated, dropped) of the truncation warning in `text`."""
    m = re.search(r"(\d+) of (\d+) (?:rows|pairs) \(([\d.]+)%\) do not fit .*?: (\d+) truncated, "
                  r"(\d+) dropped", text)
    assert m, text
    return int(m[1]), int(m[2]), float(m[3]), int(m[4]), int(m[5])


@pytest.mark.parametrize("how", ["fixed", "auto", "auto_cut_twice"])
def test_each_row_is_counted_once(tokenizer, data_cfg, jsonl, monkeypatch, caplog, how) -> None:
    path = str(jsonl(_rows(30)))
    kwargs = {}
    if how != "fixed":
        # auto_cut_twice: rows are cut at the model's context first, then at the chosen length.
        kwargs["max_context"] = 4096 if how == "auto" else 60
        monkeypatch.setattr(in_memory_module, "choose_max_seq_len",
                            lambda lengths, cap, truncation: LengthChoice(48, "auto: test"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = build_data(data_cfg(path=path, format="alpaca",
                                   max_seq_len=48 if how == "fixed" else "auto"),
                          tokenizer, attention="sdpa", seed=0, micro_batch_size=2, **kwargs)
    stats = data.stats
    assert (stats.truncated_rows, stats.dropped_rows, stats.rows) == (10, 10, 20)
    assert stats.truncated_rows + stats.dropped_rows + stats.skipped_rows <= stats.rows_read
    cut, read, percent, truncated, dropped = _reported(caplog.text)
    assert (cut, read, truncated, dropped) == (20, 30, 10, 10)
    assert percent <= 100.0


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"{i}.", "rejected": f"No, {i + 1}."}
            for i in range(n)]


@pytest.mark.parametrize("auto", [False, True])
def test_dpo_counts_an_over_long_pair_as_one_pair(tokenizer, data_cfg, jsonl, monkeypatch,
                                                  caplog, auto: bool) -> None:
    rows = _pairs(40)
    rows[5]["chosen"] = "long " * 60  # both sequences of one pair are cut
    rows[5]["rejected"] = "longer " * 60
    kwargs = {}
    if auto:
        kwargs["max_context"] = 100  # cut at the context, then at the chosen length
        monkeypatch.setattr(preference_module, "choose_max_seq_len",
                            lambda lengths, cap, truncation: LengthChoice(48, "auto: test"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = build_data(data_cfg(path=str(jsonl(rows)), max_seq_len="auto" if auto else 48),
                          tokenizer, attention="sdpa", seed=0, micro_batch_size=2, pairs=True,
                          **kwargs)
    assert (data.stats.truncated_rows, data.stats.dropped_rows) == (1, 0)
    assert data.stats.rows == 40 and data.stats.rows_read == 40
    assert _reported(caplog.text)[:4] == (1, 40, 2.5, 1)
    assert "1 of 40 pairs" in caplog.text


def test_auto_reports_the_context_when_no_row_fits(tokenizer, data_cfg, jsonl) -> None:
    rows = [{"instruction": "Read this. " + "word " * 300, "output": "ok"} for _ in range(5)]
    with pytest.raises(DataError) as err:
        build_data(data_cfg(path=str(jsonl(rows)), format="alpaca", max_seq_len="auto"),
                   tokenizer, attention="sdpa", seed=0, micro_batch_size=2, max_context=128)
    text = str(err.value)
    assert "data.max_seq_len=128" in text and "=64" not in text
    assert "model's context (128 tokens)" in text and "no larger data.max_seq_len" in text


def test_a_length_past_the_model_context_is_refused(tokenizer, data_cfg, jsonl) -> None:
    cfg = data_cfg(path=str(jsonl(_rows(6))), format="alpaca", max_seq_len=4096)
    with pytest.raises(DataError) as err:
        build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2,
                   max_context=2048)
    assert "data.max_seq_len=4096" in str(err.value) and "2048" in str(err.value)
    # Within the context, or with a model that does not say its context, it is accepted.
    build_data(data_cfg(path=cfg.path, format="alpaca", max_seq_len=2048), tokenizer,
               attention="sdpa", seed=0, micro_batch_size=2, max_context=2048)
    build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2)


def test_hint_never_advises_a_length_past_the_context(caplog) -> None:
    counts = RowCounts(read=100, truncated=30)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        warn_if_many_cut(counts, 128, "data.max_seq_len", context=2048)
    assert "at most 2048" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        warn_if_many_cut(counts, 2048, "data.max_seq_len", context=2048)
    text = caplog.text
    assert "set data.max_seq_len" not in text and "model's context (2048 tokens)" in text
    assert "no larger data.max_seq_len" in text
    assert "longer context" in text and "data.truncation=drop" in text


def test_rows_cut_at_the_full_context_get_the_context_hint(tokenizer, data_cfg, jsonl,
                                                            caplog) -> None:
    rows = _rows(30)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_data(data_cfg(path=str(jsonl(rows)), format="alpaca", max_seq_len=48), tokenizer,
                   attention="sdpa", seed=0, micro_batch_size=2, max_context=48)
    assert "set data.max_seq_len" not in caplog.text
    assert "model's context (48 tokens)" in caplog.text
