"""data.streaming=true: lazy reading, on-the-fly packing, resume from a byte-offset cursor."""

from __future__ import annotations

import itertools
import json

import pytest

from finetune.data import build_data


@pytest.fixture
def stream(tokenizer, data_cfg, jsonl, alpaca_rows):
    path = jsonl(alpaca_rows(23))

    def build(*, rank=0, world_size=1, micro_batch_size=2, attention="sdpa", **kwargs):
        kwargs.setdefault("stream_buffer", 5)
        cfg = data_cfg(path=str(path), streaming=True, **kwargs)
        return build_data(cfg, tokenizer, attention=attention, seed=3, rank=rank,
                          world_size=world_size, micro_batch_size=micro_batch_size)

    build.path = path
    return build


def rows_of(batch) -> list[tuple[int, ...]]:
    if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
        return [tuple(ids[m.bool()].tolist())
                for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return [tuple(ids.tolist()) for ids in batch["input_ids"]]


def take(train, n):
    return list(itertools.islice(iter(train), n))


def test_one_epoch_streams_every_row_once(stream, tokenizer, data_cfg):
    data = stream()
    assert data.train.samples_per_epoch is None and data.stats.rows is None
    in_memory = build_data(data_cfg(path=str(stream.path)), tokenizer, attention="sdpa", seed=0,
                           micro_batch_size=1)
    expected = sorted(tuple(in_memory.train.documents(i)[0][0].tolist()) for i in range(23))
    seen = [row for b in take(data.train, 11) for row in rows_of(b)]  # 22 of 23
    assert data.train.epoch == 0
    seen += rows_of(next(iter(data.train)))  # the 23rd, then the next epoch's first
    assert sorted(seen[:23]) == expected
    assert data.train.epoch == 1 and data.train.state_dict()["epoch"] == 1


def test_resume_continues_exactly_and_skips_what_came_before(stream):
    expected = [rows_of(b) for b in take(stream().train, 20)]  # crosses buffers and epochs
    first = stream().train
    it = iter(first)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["stream"]["start"]["positions"][0]["offset"] > 0  # a byte offset
    # Resuming must not read the rows before the cursor: make the first line unreadable.
    raw = stream.path.read_bytes()
    first_line = raw.index(b"\n")
    stream.path.write_bytes(b"x" * first_line + raw[first_line:])
    resumed = stream().train
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [rows_of(b) for b in take(resumed, 2)] == expected[7:9]
    # The rows before the cursor's buffer were counted before the save and are not read again.
    assert resumed.counts.read == 23


def test_resume_in_a_later_epoch(stream):
    expected = [rows_of(b) for b in take(stream().train, 20)]
    first = stream().train
    it = iter(first)
    for _ in range(15):
        next(it)
    assert first.epoch == 1
    resumed = stream().train
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [rows_of(b) for b in take(resumed, 5)] == expected[15:20]
    assert resumed.counts.read == 23  # the first epoch's counts came with the state


def test_two_ranks_then_one_continue_at_the_same_position(stream):
    single = [row for b in take(stream().train, 6) for row in rows_of(b)]
    rank0, rank1 = stream(rank=0, world_size=2).train, stream(rank=1, world_size=2).train
    it0, it1 = iter(rank0), iter(rank1)
    order = []
    for _ in range(2):
        order += rows_of(next(it0)) + rows_of(next(it1))
    assert order == single[:8]
    resumed = stream().train
    resumed.load_state_dict(rank1.state_dict())
    assert [row for b in take(resumed, 2) for row in rows_of(b)] == single[8:12]


def test_streaming_packs_on_the_fly_with_isolation(stream):
    data = stream(packing=True, max_seq_len=64, stream_buffer=8, attention="flash_attention_2")
    batch = next(iter(data.train))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = int((batch["position_ids"][0] == 0).sum())
    assert starts > 2  # several documents per packed row
    data = stream(packing=True, max_seq_len=64, stream_buffer=8)
    mask = next(iter(data.train))["attention_mask"]
    assert mask.shape[1:] == (1, 64, 64) or mask.shape[-1] <= 64


def test_held_out_rows_are_kept_out_of_training(stream):
    data = stream(val_split=0.3)
    val = data.val_batches(None)
    val_rows = {row for b in val for row in rows_of(b)}
    assert 0 < len(val_rows) < 23
    train_rows = {row for b in take(data.train, 12) for row in rows_of(b)}
    assert not val_rows & train_rows
    assert len(val_rows | train_rows) == 23


def test_bad_rows_are_counted_while_streaming(tokenizer, data_cfg, jsonl, alpaca_rows):
    path = jsonl(alpaca_rows(6) + [{"instruction": "only"}] + alpaca_rows(3))
    cfg = data_cfg(path=str(path), streaming=True, on_bad_row="skip", format="alpaca")
    data = build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=3)
    take(data.train, 3)
    assert data.stats.skipped_rows == 1 and data.stats.skip_reasons == {"missing_field": 1}
    assert data.val_batches(1) == []  # val_split=0 and no data.val_path
