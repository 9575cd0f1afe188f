"""Tokenizing a source in several processes, or on threads, gives exactly what one process and
the plain encoder give."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from finetune.data import DataError
from finetune.data.encode import FastEncoder, OffsetEncoder, shards
from finetune.data.sources import resolve_source

pytestmark = pytest.mark.skipif(not shards.can_fork(), reason="sharding forks (Linux only)")


@pytest.fixture(autouse=True)
def tiny_shards(monkeypatch):
    monkeypatch.setattr(shards, "MIN_SHARD_BYTES", 1)  # shard even these small files


def source_for(spec: str):
    return resolve_source(spec, split="train", json_key=None, text_unit="line")


def tokenize(tokenizer, data_cfg, spec: str, num_proc: int, *, plain: bool = False,
             **settings):
    """The source through the fast encoder (forking with num_proc > 1), or the plain one."""
    cfg = data_cfg(path=spec, num_proc=num_proc, **settings)
    encoder = (OffsetEncoder if plain else FastEncoder)(
        tokenizer, tokenizer.chat_template, max_seq_len=cfg.max_seq_len,
        on_bad_row=cfg.on_bad_row)
    return encoder.encode_source(source_for(spec), cfg, "key")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def alpaca_lines(rows: list[dict], bad_at: tuple[int, ...] = ()) -> list[str]:
    lines = [json.dumps(r) for r in rows]
    for i in bad_at:
        lines[i] = '{"instruction": "broken'
    return lines


def test_pieces_start_at_line_starts_with_their_line_numbers(tmp_path, alpaca_rows):
    path = write_lines(tmp_path / "d.jsonl", alpaca_lines(alpaca_rows(50)))
    data = path.read_bytes()
    plan = shards.plan_shards(source_for(str(path)), 3)
    assert plan.processes == 3 and len(plan.starts) == 3 * shards.PIECES_PER_PROCESS
    assert plan.starts[0].file.offset == 0 and plan.starts == sorted(set(plan.starts))
    for start in plan.starts[1:]:
        offset, number = start.file.offset, start.file.number
        assert data[offset - 1:offset] == b"\n"
        assert data[:offset].count(b"\n") + 1 == number


def test_pieces_span_files(tmp_path, alpaca_rows):
    folder = tmp_path / "parts"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_lines(folder / f"{name}.jsonl", alpaca_lines(alpaca_rows(7)))
    starts = shards.plan_shards(source_for(str(folder)), 4).starts
    assert {s.file_index for s in starts} == {0, 1, 2}
    for start in starts:
        data = (sorted(folder.iterdir())[start.file_index]).read_bytes()
        assert data[:start.file.offset].count(b"\n") + 1 == start.file.number


def test_one_process_for_formats_that_cannot_be_cut(tmp_path, alpaca_rows):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(alpaca_rows(50)))
    assert shards.plan_shards(source_for(str(path)), 4) is None
    jsonl = write_lines(tmp_path / "d.jsonl", alpaca_lines(alpaca_rows(50)))
    assert shards.plan_shards(source_for(str(jsonl)), 1) is None


def test_a_negative_num_proc_is_refused(tokenizer, data_cfg, tmp_path, alpaca_rows):
    from finetune.data import build_data

    path = write_lines(tmp_path / "d.jsonl", alpaca_lines(alpaca_rows(5)))
    with pytest.raises(DataError, match=r"data.num_proc=-1 must be 0 \(one process per CPU\)"):
        build_data(data_cfg(path=str(path), num_proc=-1), tokenizer, attention="sdpa", seed=0,
                   micro_batch_size=2)


def test_sharded_tokenizing_matches_one_process(tokenizer, data_cfg, tmp_path, alpaca_rows):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = alpaca_rows(120)
    write_lines(folder / "a.jsonl", alpaca_lines(rows[:70], bad_at=(3, 41)) + ["", "  "])
    write_lines(folder / "b.jsonl", [""] + alpaca_lines(rows[70:], bad_at=(30,)))
    one = tokenize(tokenizer, data_cfg, str(folder), 1, on_bad_row="skip")
    many = tokenize(tokenizer, data_cfg, str(folder), 3, on_bad_row="skip")
    plain = tokenize(tokenizer, data_cfg, str(folder), 3, on_bad_row="skip", plain=True)
    for name in ("tokens", "trained", "offsets"):
        assert np.array_equal(getattr(one.rows, name), getattr(many.rows, name)), name
        assert np.array_equal(getattr(plain.rows, name), getattr(many.rows, name)), name
    assert many.counts.to_dict() == one.counts.to_dict() == plain.counts.to_dict()
    assert many.counts.read == 120 and many.counts.skipped["malformed_json"] == 3
    assert f"{folder / 'a.jsonl'}:4: malformed JSON" in many.counts.first_skips[0]
    assert f"{folder / 'b.jsonl'}:32: malformed JSON" in many.counts.first_skips[2]


def test_sharded_text_lines_match_one_process(tokenizer, data_cfg, tmp_path):
    path = write_lines(tmp_path / "d.txt", [f"document number {i}" + " word" * (i % 9)
                                            for i in range(80)])
    one = tokenize(tokenizer, data_cfg, str(path), 1, format="text")
    many = tokenize(tokenizer, data_cfg, str(path), 3, format="text")
    assert np.array_equal(one.rows.tokens, many.rows.tokens)
    assert np.array_equal(one.rows.offsets, many.rows.offsets)


def test_the_first_bad_line_is_reported_whichever_process_finds_it(tokenizer, data_cfg,
                                                                    tmp_path, alpaca_rows):
    lines = alpaca_lines(alpaca_rows(90))
    path = write_lines(tmp_path / "d.jsonl", lines)
    starts = shards.plan_shards(source_for(str(path)), 3).starts
    bad = [starts[5].file.number + 1, starts[9].file.number + 1]  # in two later pieces
    for number in bad:  # broken lines of the same length keep the piece boundaries
        lines[number - 1] = '{"instruction": "broken'.ljust(len(lines[number - 1]))
    write_lines(path, lines)
    assert shards.plan_shards(source_for(str(path)), 3).starts == starts
    with pytest.raises(DataError, match=rf"^{path}:{bad[0]}: malformed JSON"):
        tokenize(tokenizer, data_cfg, str(path), 3)


def test_a_worker_that_dies_is_redone_in_this_process(tokenizer, data_cfg, tmp_path,
                                                      alpaca_rows, monkeypatch, caplog):
    path = write_lines(tmp_path / "d.jsonl", alpaca_lines(alpaca_rows(60)))
    expected = tokenize(tokenizer, data_cfg, str(path), 1)
    parent, original = os.getpid(), FastEncoder._encode_rows
    died = tmp_path / "child-died"

    def dies_in_a_child(*args, **kwargs):
        if os.getpid() != parent:
            died.touch()
            os._exit(3)
        # This process takes pieces too: it waits until the child has taken one and died, or
        # on a fast run it could take every piece before the child starts.
        deadline = time.monotonic() + 60  # a wait for the child, not a timing check
        while not died.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return original(*args, **kwargs)

    monkeypatch.setattr(FastEncoder, "_encode_rows", dies_in_a_child)
    with caplog.at_level(logging.WARNING, logger="finetune.data.encode.shards"):
        got = tokenize(tokenizer, data_cfg, str(path), 2)
    assert np.array_equal(got.rows.tokens, expected.rows.tokens)
    assert got.counts.to_dict() == expected.counts.to_dict()
    assert "exited before reporting" in caplog.text and "tokenizing that part here" in caplog.text


def test_threaded_batches_match_one_batch_at_a_time(tokenizer, monkeypatch):
    from finetune.data.encode import fast
    from finetune.data.errors import RowOrigin
    from finetune.data.formats import Example
    from finetune.data.tokenized import RowCounts, TokenizedRows

    monkeypatch.setattr(fast, "TOKENIZE_CHUNK", 3)  # several chunks per batch to share
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    encoder = FastEncoder(tokenizer, tokenizer.chat_template, max_seq_len=64)
    items = [(Example(messages=[("user", f"question {i}" + " more" * (i % 5)),
                                ("assistant", f"answer {i}")]), RowOrigin("t.jsonl", i + 1))
             for i in range(40)]
    batches = [items[i:i + 7] for i in range(0, 40, 7)]
    threaded = TokenizedRows.concat(list(encoder.encode_batches(iter(batches), RowCounts())))
    plain = OffsetEncoder(tokenizer, tokenizer.chat_template, max_seq_len=64)
    serial = TokenizedRows.concat(list(plain.encode_batches(iter(batches), RowCounts())))
    assert np.array_equal(threaded.tokens, serial.tokens)
    assert np.array_equal(threaded.trained, serial.trained)
    assert np.array_equal(threaded.offsets, serial.offsets)
    import gc

    assert gc.isenabled() and "TOKENIZERS_PARALLELISM" not in os.environ
