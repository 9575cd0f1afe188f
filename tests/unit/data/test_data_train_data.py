"""InMemoryData and StreamingData both keep the TrainData contract, by behaviour: on the same
file, in file order, they give the same training batches, held-out batches and preview, and
both resume from their own state."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from finetune.data import (
    DataStats,
    InMemoryData,
    ResumableBatches,
    StreamingData,
    TrainData,
    build_data,
)

KINDS = {"in_memory": InMemoryData, "streaming": StreamingData}


@pytest.fixture
def both(tokenizer, data_cfg, jsonl, alpaca_rows):
    """build(streaming) -> TrainData over 11 training rows and 5 held-out rows, in file order."""
    train, val = jsonl(alpaca_rows(11), "train.jsonl"), jsonl(alpaca_rows(5, start=50), "v.jsonl")

    def build(streaming: bool) -> TrainData:
        cfg = data_cfg(path=str(train), val_path=str(val), shuffle=False, streaming=streaming,
                       stream_buffer=4)
        return build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2)

    return build


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_class_meets_the_contract(both, tokenizer, kind):
    data = both(kind == "streaming")
    assert isinstance(data, KINDS[kind]) and isinstance(data, TrainData)
    assert isinstance(data.train, ResumableBatches)
    assert data.train.samples_per_epoch == (None if kind == "streaming" else 11)
    assert data.train.epoch == 0
    assert isinstance(data.stats, DataStats) and data.stats.streaming == (kind == "streaming")
    assert json.loads(json.dumps(data.stats.to_dict()))["format"] == "alpaca"

    preview = data.preview(3)
    assert len(preview) == 3
    for ids, trained in preview:
        assert len(ids) == len(trained) and trained.dtype == bool
        assert ids[0] == tokenizer.bos_token_id and not trained[0] and trained.any()
    assert len(data.preview(100)) == 11  # no more than there are

    val = data.val_batches()
    assert len(val) == 3  # 5 rows in batches of 2
    for batch in val:
        assert {"input_ids", "labels", "position_ids", "attention_mask",
                "loss_positions"} == set(batch)
        assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] <= 2
    assert same_batches(data.val_batches(2), val[:2])


def test_both_classes_give_the_same_data_in_file_order(both):
    memory, stream = both(False), both(True)
    assert same_batches(memory.val_batches(), stream.val_batches())
    for (ids_m, trained_m), (ids_s, trained_s) in zip(memory.preview(5), stream.preview(5),
                                                      strict=True):
        assert np.array_equal(ids_m, ids_s) and np.array_equal(trained_m, trained_s)
    first_epoch = [list(itertools.islice(iter(d.train), 5)) for d in (memory, stream)]
    assert same_batches(*first_epoch)  # 10 of the 11 rows, in file order, by both


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_class_resumes_from_its_own_state(both, kind):
    expected = list(itertools.islice(iter(both(kind == "streaming").train), 8))
    first = both(kind == "streaming").train
    it = iter(first)
    for _ in range(6):  # past the end of the first epoch (11 rows)
        next(it)
    assert first.epoch == 1
    resumed = both(kind == "streaming").train
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.epoch == 1
    assert same_batches(list(itertools.islice(iter(resumed), 2)), expected[6:8])
