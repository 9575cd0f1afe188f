"""The batch assembly on arrays equals the per-row reference (BOS, truncation, drops, trained
flags, counts), whatever the template, train_on, truncation and tokenizer path."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from finetune.data import DataError
from finetune.data.errors import RowOrigin
from finetune.data.formats import Example
from finetune.data.template import BUILTIN_CHAT_TEMPLATE, ChatRenderer
from finetune.data.tokenized import ExampleEncoder, RowCounts

WORDS = ["alpha", " beta", "  ", "\n", "é", "中文", "42", "<|end|>", "\u2581", "", "x y z"]


def conversation(rng: random.Random) -> Example:
    def text() -> str:
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))

    turns = [("system", text())] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns += [("user", text()), ("assistant", text())]
    return Example(messages=turns)


CASES = list(itertools.product(
    ["tokenizer", "builtin"], ["assistant", "all", "last_turn"], ["truncate", "drop"],
    [6, 20, 512], ["byte_lengths", "offsets", "no_bos"]))


@pytest.mark.parametrize("template,train_on,truncation,max_seq_len,path", CASES)
def test_arrays_equal_rows(tokenizer, template, train_on, truncation, max_seq_len, path):
    source = tokenizer.chat_template if template == "tokenizer" else BUILTIN_CHAT_TEMPLATE
    encoder = ExampleEncoder(tokenizer, ChatRenderer(tokenizer, source, train_on=train_on),
                             max_seq_len=max_seq_len, truncation=truncation)
    encoder.warm_up()
    assert encoder._token_bytes is not None
    if path == "offsets":
        encoder._token_bytes = None
    if path == "no_bos":  # a tokenizer without BOS (Qwen): none is added
        encoder.bos = None
    rng = random.Random(hash((template, train_on, truncation, max_seq_len, path)) % 1000)
    items = [(conversation(rng), RowOrigin("t.jsonl", i + 1)) for i in range(120)]
    batch = encoder._render(items, RowCounts())
    encoded = encoder._encode_texts(batch.texts)
    assert not any(e for spans in batch.spans for _, _, e in spans)  # no EOS to insert
    ours, theirs = RowCounts(), RowCounts()
    got = encoder._assemble_arrays(batch, encoded, ours)
    want = encoder._assemble_rows(batch, encoded, theirs)
    assert np.array_equal(got.offsets, want.offsets)
    assert np.array_equal(got.tokens, want.tokens) and got.tokens.dtype == want.tokens.dtype
    assert np.array_equal(got.trained, want.trained)
    assert ours.to_dict() == theirs.to_dict()
    if max_seq_len == 6:
        assert ours.truncated + ours.dropped > 0  # the case exercises truncation


def test_arrays_raise_like_rows_on_too_long_rows(tokenizer):
    encoder = ExampleEncoder(tokenizer, ChatRenderer(tokenizer, tokenizer.chat_template),
                             max_seq_len=12, truncation="error")
    items = [(Example(messages=[("user", "hi"), ("assistant", "ok")]), RowOrigin("t.jsonl", 1)),
             (Example(messages=[("user", "word " * 9), ("assistant", "yes")]),
              RowOrigin("t.jsonl", 2))]
    batch = encoder._render(items, RowCounts())
    encoded = encoder._encode_texts(batch.texts)
    messages = []
    for assemble in (encoder._assemble_arrays, encoder._assemble_rows):
        with pytest.raises(DataError, match=r"^t.jsonl:2: \d+ tokens, longer than") as caught:
            assemble(batch, encoded, RowCounts())
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
