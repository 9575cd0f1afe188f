"""The training order: deterministic, resumable in O(1), continuing across world sizes."""

from __future__ import annotations

import itertools
import json

import pytest

from finetune.data import DataError, build_data


@pytest.fixture
def make(tokenizer, data_cfg, jsonl, alpaca_rows):
    path = jsonl(alpaca_rows(10))

    def build(*, seed=0, rank=0, world_size=1, micro_batch_size=2, **kwargs):
        cfg = data_cfg(path=str(path), **kwargs)
        return build_data(cfg, tokenizer, attention="sdpa", seed=seed, rank=rank,
                          world_size=world_size, micro_batch_size=micro_batch_size).train

    return build


def rows_of(batch) -> list[tuple[int, ...]]:
    """Each example of a batch as a tuple of its (unpadded) token ids."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        out.append(tuple(ids[mask.bool()].tolist()))
    return out


def take(train, n: int) -> list:
    return list(itertools.islice(iter(train), n))


def test_same_seed_same_order_other_seed_other_order(make):
    first = [rows_of(b) for b in take(make(seed=1), 5)]
    assert first == [rows_of(b) for b in take(make(seed=1), 5)]
    assert first != [rows_of(b) for b in take(make(seed=2), 5)]


def test_every_epoch_is_a_permutation_and_rollover_is_explicit(make):
    train = make()
    assert train.samples_per_epoch == 10
    examples = [row for batch in take(train, 5) for row in rows_of(batch)]  # 10 = one epoch
    assert len(set(examples)) == 10
    assert train.state_dict()["epoch"] == 1 and train.epoch == 1
    train = make(micro_batch_size=4)
    batches = take(train, 3)  # 12 examples: the third batch takes 2 from epoch 0, 2 from epoch 1
    seen = [row for b in batches for row in rows_of(b)]
    assert len(set(seen[:10])) == 10
    assert train.state_dict()["position"] == 12 and train.epoch == 1
    epoch1 = [row for b in take(make(micro_batch_size=2), 10)[5:] for row in rows_of(b)]
    assert seen[10:] == epoch1[:2]  # the next epoch's own permutation, not a replay of epoch 0


def test_resume_equals_continued_iteration_without_replay(make):
    straight = make()
    expected = [rows_of(b) for b in take(straight, 9)]
    first = make()
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert state["position"] == 8
    resumed = make()
    calls = []
    original = resumed.collator
    resumed.collator = lambda rows: calls.append(1) or original(rows)
    resumed.load_state_dict(state)
    assert calls == []  # O(1): nothing replayed
    assert [rows_of(b) for b in take(resumed, 5)] == expected[4:]


def test_two_ranks_then_one_continue_at_the_same_global_position(make):
    single = [row for b in take(make(), 8) for row in rows_of(b)]  # W=1, B=2: 16 examples
    rank0, rank1 = make(rank=0, world_size=2), make(rank=1, world_size=2)
    it0, it1 = iter(rank0), iter(rank1)
    global_order = []
    for _ in range(2):  # two steps of 2 ranks x 2 examples
        global_order += rows_of(next(it0)) + rows_of(next(it1))
    assert global_order == single[:8]
    assert rank0.state_dict() == rank1.state_dict()
    resumed = make(world_size=1)
    resumed.load_state_dict(rank0.state_dict())
    assert [row for b in take(resumed, 4) for row in rows_of(b)] == single[8:16]


def test_resume_with_other_data_is_refused(make):
    state = make().state_dict()
    with pytest.raises(DataError, match="samples per epoch"):
        make(val_split=0.2).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        make(seed=5).load_state_dict(state)
