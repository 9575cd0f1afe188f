"""Preference pairs: batches hold the chosen rows then the rejected rows of the same pairs, the
prompt is masked and only the completions are trained, pairs are kept or dropped whole, and bad
rows and settings are refused with their location and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.data import DataError, build_data
from finetune.data.collate import IGNORE_INDEX
from finetune.data.preference import PreferenceData, scored_pairs


def pairs(n: int, *, start: int = 0) -> list[dict]:
    """String pairs: prompt / a short chosen answer / a longer rejected one."""
    return [{"prompt": f"Question {i}: what is {i} plus one?",
             "chosen": f"{i + 1}.",
             "rejected": f"Well, let me think about it for a while. It is {i + 1}, I believe."}
            for i in range(start, start + n)]


def build(tokenizer, cfg, **kwargs) -> PreferenceData:
    kwargs.setdefault("micro_batch_size", 2)
    return build_data(cfg, tokenizer, attention="sdpa", seed=0, pairs=True, **kwargs)


def completion(tokenizer, batch: dict, row: int) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_batch_holds_chosen_rows_then_rejected_rows_of_the_same_pairs(tokenizer, data_cfg, jsonl):
    cfg = data_cfg(path=str(jsonl(pairs(6))), shuffle=False)
    data = build(tokenizer, cfg, micro_batch_size=3)
    assert isinstance(data, PreferenceData) and data.stats.format == "preference"
    assert data.stats.rows == data.num_pairs == 6
    batch = next(iter(data.train))
    assert batch["input_ids"].shape[0] == 6 and batch["pair_ids"].tolist() == [0, 1, 2]
    assert batch["pair_mask"].tolist() == [True] * 3 and scored_pairs(batch) == 3
    for i in range(3):
        assert completion(tokenizer, batch, i) == f"{i + 1}.<|end|>"
        assert completion(tokenizer, batch, 3 + i).startswith("Well, let me think")
        # Same prompt in both rows of a pair, and none of it is trained.
        chosen, rejected = batch["input_ids"][i], batch["input_ids"][3 + i]
        prompt = tokenizer(f"Question {i}: what is {i} plus one?",
                           add_special_tokens=False)["input_ids"]
        width = 1 + len(prompt)  # BOS + prompt
        assert torch.equal(chosen[:width], rejected[:width])
        assert (batch["labels"][i, :width] == IGNORE_INDEX).all()


def test_conversations_with_a_shared_prefix_train_only_the_last_turn(tokenizer, data_cfg, jsonl):
    prefix = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Name a fruit."}]
    row = {"chosen": prefix + [{"role": "assistant", "content": "Pear."}],
           "rejected": prefix + [{"role": "assistant", "content": "Well, maybe a pear?"}]}
    data = build(tokenizer, data_cfg(path=str(jsonl([row, row]))))
    batch = next(iter(data.train))
    assert completion(tokenizer, batch, 0) == "Pear.<|end|>"
    assert completion(tokenizer, batch, 2) == "Well, maybe a pear?<|end|>"
    assert "Hello!" in tokenizer.decode(batch["input_ids"][0])  # in the prompt, not trained


def test_prompt_as_messages_with_answers_as_messages(tokenizer, data_cfg, jsonl):
    row = {"prompt": [{"role": "user", "content": "Name a fruit."}],
           "chosen": [{"role": "assistant", "content": "Pear."}],
           "rejected": [{"role": "assistant", "content": "A rock."}]}
    batch = next(iter(build(tokenizer, data_cfg(path=str(jsonl([row, row]))),
                            micro_batch_size=1).train))
    assert [completion(tokenizer, batch, r) for r in (0, 1)] == ["Pear.<|end|>", "A rock.<|end|>"]


def test_missing_rejected_names_the_file_line_and_field(tokenizer, data_cfg, jsonl):
    rows = pairs(3)
    del rows[1]["rejected"]
    path = jsonl(rows)
    with pytest.raises(DataError, match=rf"{path.name}:2: missing field 'rejected'"):
        build(tokenizer, data_cfg(path=str(path)))


def test_conversations_that_differ_before_the_last_turn_are_refused(tokenizer, data_cfg, jsonl):
    row = {"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}
    path = jsonl([row])
    with pytest.raises(DataError, match=rf"{path.name}:1: 'chosen' and 'rejected' differ before"):
        build(tokenizer, data_cfg(path=str(path)))


def test_bad_rows_are_skipped_as_whole_pairs(tokenizer, data_cfg, jsonl):
    rows = pairs(4)
    rows[2]["rejected"] = None
    data = build(tokenizer, data_cfg(path=str(jsonl(rows)), on_bad_row="skip"))
    assert data.num_pairs == 3 and data.stats.skipped_rows == 1


@pytest.mark.parametrize(("setting", "message"), [
    ({"packing": True}, "data.packing=true is not supported"),
    ({"streaming": True, "max_seq_len": 64}, "data.streaming=true is not supported"),
    ({"train_on": "all"}, "data.train_on=all"),
    ({"format": "alpaca"}, "data.format=alpaca gives no preference pairs"),
])
def test_settings_that_cannot_give_pairs_are_refused(tokenizer, data_cfg, jsonl, setting, message):
    with pytest.raises(DataError, match=message):
        build(tokenizer, data_cfg(path=str(jsonl(pairs(2))), **setting))


def test_drop_removes_whole_pairs_and_keeps_the_others_aligned(tokenizer, data_cfg, jsonl):
    rows = pairs(5)
    rows[1]["rejected"] = "much too long " * 40
    data = build(tokenizer, data_cfg(path=str(jsonl(rows)), max_seq_len=96, truncation="drop",
                                     shuffle=False), micro_batch_size=4)
    assert data.num_pairs == 4 and data.stats.dropped_rows == 1
    batch = next(iter(data.train))
    assert [completion(tokenizer, batch, r) for r in range(4)] == [
        "1.<|end|>", "3.<|end|>", "4.<|end|>", "5.<|end|>"]


def test_auto_length_cuts_pairs_like_a_fixed_length(tokenizer, data_cfg, jsonl):
    rows = pairs(150)
    rows[7]["rejected"] = "long " * 200  # the one pair past the 99% length
    path = str(jsonl(rows))
    auto = build(tokenizer, data_cfg(path=path, max_seq_len="auto", truncation="drop"),
                 max_context=2048)
    assert auto.stats.max_seq_len_from.startswith("auto") and auto.stats.max_seq_len < 100
    fixed = build(tokenizer, data_cfg(path=path, max_seq_len=auto.stats.max_seq_len,
                                      truncation="drop"))
    assert auto.num_pairs == fixed.num_pairs == 149
    assert np.array_equal(auto.train.rows.tokens, fixed.train.rows.tokens)


def test_held_out_pairs_and_the_filler_pair_of_an_uneven_rank(tokenizer, data_cfg, jsonl):
    cfg = data_cfg(path=str(jsonl(pairs(4))), val_path=str(jsonl(pairs(3, start=10), "v.jsonl")))
    rank1 = build(tokenizer, cfg, rank=1, world_size=2)
    batches = rank1.val_batches()
    assert len(batches) == 1 and batches[0]["pair_mask"].tolist() == [True]
    assert batches[0]["pair_ids"].tolist() == [4 + 2]  # held-out pair 2, after 4 training pairs
    assert completion(tokenizer, batches[0], 0) == "13.<|end|>"
    rank0 = build(tokenizer, cfg, rank=0, world_size=2, micro_batch_size=3)
    empty = build(tokenizer, cfg, rank=1, world_size=2, micro_batch_size=3).val_batches()
    assert scored_pairs(rank0.val_batches()[0]) == 3
    assert empty[0]["pair_mask"].tolist() == [False] and scored_pairs(empty[0]) == 0
    assert rank0.num_all_pairs == 7


def test_resume_continues_at_the_same_pairs(tokenizer, data_cfg, jsonl):
    cfg = data_cfg(path=str(jsonl(pairs(7))))
    first = build(tokenizer, cfg)
    stream = iter(first.train)
    for _ in range(5):  # into the second epoch
        next(stream)
    state = first.train.state_dict()
    expected = next(stream)
    again = build(tokenizer, cfg)
    again.train.load_state_dict(state)
    got = next(iter(again.train))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_pairs_are_cached_apart_from_the_rows_of_the_same_file(tokenizer, data_cfg, jsonl):
    cfg = data_cfg(path=str(jsonl(pairs(4))))
    assert not build(tokenizer, cfg).stats.sources[0]["from_cache"]
    assert build(tokenizer, cfg).stats.sources[0]["from_cache"]
    rows = build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=2)
    assert rows.stats.rows == 4 and not rows.stats.sources[0]["from_cache"]
    assert rows.train.rows.offsets[-1] < build(tokenizer, cfg).train.rows.offsets[-1]


def test_pair_batches_walk_every_pair_once_in_order(tokenizer, data_cfg, jsonl):
    cfg = data_cfg(path=str(jsonl(pairs(5))), val_path=str(jsonl(pairs(2, start=10), "v.jsonl")))
    walked = list(build(tokenizer, cfg).pair_batches(3))
    assert [b["pair_ids"].tolist() for b in walked] == [[0, 1, 2], [3, 4, 5], [6]]
    assert completion(tokenizer, walked[1], 1) == "5.<|end|>"  # the last training pair
    assert completion(tokenizer, walked[2], 0) == "12.<|end|>"  # the last held-out pair
