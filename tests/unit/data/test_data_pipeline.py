"""build_data as a whole: cache, held-out split, mixtures, statistics, batch shapes."""

from __future__ import annotations

import os

import pytest
import torch

from finetune.data import DataError, build_data
from finetune.data.encode import FastEncoder


def _build(cfg, tokenizer, **kwargs):
    kwargs.setdefault("micro_batch_size", 2)
    return build_data(cfg, tokenizer, attention=kwargs.pop("attention", "sdpa"), seed=0, **kwargs)


@pytest.fixture
def count_tokenizer_calls(monkeypatch):
    calls = []
    original = FastEncoder._tokenize

    def counting(self, texts):
        calls.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(FastEncoder, "_tokenize", counting)
    return calls


def test_second_build_reads_the_cache_without_tokenizing(tokenizer, data_cfg, jsonl, alpaca_rows,
                                                         count_tokenizer_calls, tmp_path):
    path = jsonl(alpaca_rows(50))
    cfg = data_cfg(path=str(path), packing=True, max_seq_len=64)
    first = _build(cfg, tokenizer)
    assert count_tokenizer_calls and not first.stats.sources[0]["from_cache"]
    count_tokenizer_calls.clear()
    second = _build(cfg, tokenizer)
    assert count_tokenizer_calls == []
    assert second.stats.sources[0]["from_cache"]
    assert second.stats.to_dict() | {"sources": None} == first.stats.to_dict() | {"sources": None}
    a, b = next(iter(first.train)), next(iter(second.train))
    assert all(torch.equal(a[k], b[k]) for k in a)
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 1 and not entries[0].startswith(".")  # no temporary folder left


def test_cache_is_invalidated_by_data_and_settings(tokenizer, data_cfg, jsonl, alpaca_rows,
                                                   count_tokenizer_calls):
    path = jsonl(alpaca_rows(5))
    _build(data_cfg(path=str(path)), tokenizer)
    count_tokenizer_calls.clear()
    _build(data_cfg(path=str(path), max_seq_len=100), tokenizer)  # a setting that changes tokens
    assert count_tokenizer_calls
    count_tokenizer_calls.clear()
    jsonl(alpaca_rows(6))  # the file changed
    assert _build(data_cfg(path=str(path)), tokenizer).stats.rows == 6
    assert count_tokenizer_calls


def test_cache_dir_defaults_to_finetune_cache(tokenizer, jsonl, alpaca_rows, monkeypatch, tmp_path):
    from finetune.config.data import DataConfig

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "fc"))
    _build(DataConfig(path=str(jsonl(alpaca_rows(3))), val_split=0), tokenizer)
    assert len(os.listdir(tmp_path / "fc" / "data")) == 1


def test_held_out_split_is_fixed_across_seeds(tokenizer, data_cfg, jsonl, alpaca_rows):
    cfg = data_cfg(path=str(jsonl(alpaca_rows(40))), val_split=0.1)
    datas = [build_data(cfg, tokenizer, attention="sdpa", seed=s, micro_batch_size=2)
             for s in (0, 1)]
    assert datas[0].stats.val_rows == 4 and datas[0].stats.rows == 36
    vals = [d.val_batches(None) for d in datas]
    assert len(vals[0]) == 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(*vals, strict=True))
    assert len(datas[0].val_batches(1)) == 1


def test_val_path_and_rank_sharded_held_out_batches(tokenizer, data_cfg, jsonl, alpaca_rows):
    train, val = jsonl(alpaca_rows(8), "train.jsonl"), jsonl(alpaca_rows(5, start=100), "val.jsonl")
    cfg = data_cfg(path=str(train), val_path=str(val))
    ranks = [build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2, rank=r,
                        world_size=2).val_batches(None) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2]  # same number of batches on every rank
    sizes = [[b["input_ids"].shape[0] for b in r] for r in ranks]
    assert sizes == [[2, 1], [2, 1]]
    filler = ranks[1][1]  # rank 1 has nothing left in the second step: a fully masked filler
    assert (filler["labels"] == -100).all()
    trained = sum(int((b["labels"] != -100).sum()) for r in ranks for b in r)
    alone = build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=8)
    assert trained == int((alone.val_batches(None)[0]["labels"] != -100).sum())


def test_mixture_weights_set_each_source_share(tokenizer, data_cfg, jsonl, alpaca_rows):
    a = jsonl(alpaca_rows(10), "a.jsonl")
    b = jsonl([{"text": f"document {i}"} for i in range(10)], "b.jsonl")
    data = _build(data_cfg(path=[str(a), str(b)], weights=[3, 1]), tokenizer)
    assert data.stats.rows == 20 and data.stats.format == "alpaca+text"
    docs = [data.train.documents(i)[0][0] for i in range(20)]
    from_b = sum(tokenizer.decode(ids.tolist()).startswith("<|begin|>document") for ids in docs)
    assert from_b == 5
    with pytest.raises(DataError, match="data.weights has 1 values for 2"):
        _build(data_cfg(path=[str(a), str(b)], weights=[1]), tokenizer)


def test_stats_count_tokens_and_packing_efficiency(tokenizer, data_cfg, jsonl, alpaca_rows):
    cfg = data_cfg(path=str(jsonl(alpaca_rows(30))), packing=True, max_seq_len=128)
    stats = _build(cfg, tokenizer).stats.to_dict()
    assert stats["rows"] == 30 and stats["packed_sequences"] >= 1
    assert stats["packing_efficiency"] == pytest.approx(
        stats["tokens"] / (stats["packed_sequences"] * 128), abs=1e-4)
    assert 0 < stats["trained_tokens"] < stats["tokens"]
    for key in ("format", "rows", "tokens", "trained_tokens", "skipped_rows", "truncated_rows",
                "dropped_rows", "packed_sequences", "packing_efficiency"):
        assert key in stats


def test_unpacked_batch_shapes_and_labels(tokenizer, data_cfg, jsonl, alpaca_rows):
    data = _build(data_cfg(path=str(jsonl(alpaca_rows(6)))), tokenizer)
    batch = next(iter(data.train))
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask",
                          "loss_positions"}
    shape = batch["input_ids"].shape
    assert all(v.shape == shape and v.dtype == torch.long
               for k, v in batch.items() if k != "loss_positions")
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all()
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("attention", ["sdpa_varlen", "flash_attention_2"])
def test_padding_free_batches_hold_the_padded_rows_without_their_padding(
        tokenizer, data_cfg, jsonl, alpaca_rows, attention):
    """data.padding_free=auto with an attention that takes padding-free rows: each
    micro-batch is one row of the same examples, in the same order, with nothing dropped."""
    path = str(jsonl(alpaca_rows(12)))
    padded = _build(data_cfg(path=path, val_split=0.0, padding_free="off"), tokenizer,
                    attention=attention)
    free = _build(data_cfg(path=path, val_split=0.0), tokenizer, attention=attention)
    assert free.stats.padding_free and not padded.stats.padding_free
    assert free.stats.isolation is None  # still unpacked: one example per document
    for a, b, _ in zip(padded.train, free.train, range(6), strict=False):  # endless
        keep = a["attention_mask"].bool()
        assert "attention_mask" not in b and b["input_ids"].shape == (1, int(keep.sum()))
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(b[key][0], a[key][keep]), key


def test_padding_free_needs_an_attention_that_isolates_examples(tokenizer, data_cfg, jsonl,
                                                                alpaca_rows):
    path = str(jsonl(alpaca_rows(6)))
    assert not _build(data_cfg(path=path), tokenizer, attention="sdpa").stats.padding_free
    with pytest.raises(DataError, match="data.padding_free=on needs an attention"):
        _build(data_cfg(path=path, padding_free="on"), tokenizer, attention="sdpa")
    packed = _build(data_cfg(path=path, packing=True, max_seq_len=64), tokenizer,
                    attention="sdpa_varlen")
    assert packed.stats.isolation == "varlen" and not packed.stats.padding_free


def test_packing_refuses_an_attention_that_cannot_isolate(tokenizer, data_cfg, jsonl, alpaca_rows):
    cfg = data_cfg(path=str(jsonl(alpaca_rows(3))), packing=True)
    with pytest.raises(DataError, match="cannot keep packed documents apart"):
        _build(cfg, tokenizer, attention="paged|sdpa")


def test_mask_dtype_follows_the_model_dtype(tokenizer, data_cfg, jsonl, alpaca_rows):
    cfg = data_cfg(path=str(jsonl(alpaca_rows(6))), packing=True, max_seq_len=64)
    batch = next(iter(_build(cfg, tokenizer, mask_dtype=torch.bfloat16).train))
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bfloat16 and mask.shape[1] == 1
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}


@pytest.mark.parametrize("key", ["truncation", "on_bad_row", "train_on", "text_unit"])
def test_closed_set_settings_are_read_through_the_config_enums(tokenizer, tmp_path, key):
    """A library caller's plain string is checked against the config Enum, whose members the
    message lists (the data package keeps no list of its own)."""
    from finetune.config import data as schema
    from finetune.data.encode import OffsetEncoder
    from finetune.data.readers import read_file

    enum = {"truncation": schema.Truncation, "on_bad_row": schema.OnBadRow,
            "train_on": schema.TrainOn, "text_unit": schema.TextUnit}[key]
    message = rf"^data\.{key}='nope' is not one of {', '.join(enum.__members__)}$"
    with pytest.raises(DataError, match=message):
        if key == "text_unit":
            (tmp_path / "d.txt").write_text("a line\n")
            list(read_file(tmp_path / "d.txt", text_unit="nope"))
        else:
            OffsetEncoder(tokenizer, tokenizer.chat_template, max_seq_len=8, **{key: "nope"})


def test_a_data_error_is_a_user_error_with_exit_code_2(tokenizer, data_cfg, tmp_path):
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError) as caught:
        _build(data_cfg(path=str(tmp_path / "missing.jsonl")), tokenizer)
    assert isinstance(caught.value, DataError) and isinstance(caught.value, ValueError)
    assert caught.value.exit_code == 2


def test_messages_point_to_the_right_fix(tokenizer, data_cfg, jsonl, tmp_path, caplog):
    """A model folder as data, a missing val_path, numbers where text belongs, and a skipped
    row's warning: each message names the right key and fix."""
    import logging

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="is a model folder") as info:
        _build(data_cfg(path=str(model)), tokenizer, micro_batch_size=2)
    assert "json_key" not in str(info.value)

    good = str(jsonl([{"instruction": "a", "output": "b"}] * 4))
    with pytest.raises(DataError, match=r"data.val_path='/no/val.jsonl'.*set data.val_path"):
        _build(data_cfg(path=good, val_path="/no/val.jsonl"), tokenizer, micro_batch_size=2)

    numbers = str(jsonl([{"instruction": 5, "output": "b"}, {"instruction": "a", "output": "b"}],
                        name="n.jsonl"))
    with pytest.raises(DataError, match=r'n.jsonl:1: .*got int \(5\).*"instruction": "5"'):
        _build(data_cfg(path=numbers), tokenizer, micro_batch_size=1)
    with caplog.at_level(logging.WARNING):
        _build(data_cfg(path=numbers, on_bad_row="skip"), tokenizer, micro_batch_size=1)
    assert "skipping" in caplog.text and "on_bad_row" not in caplog.text
