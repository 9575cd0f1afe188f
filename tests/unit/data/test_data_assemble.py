"""The package's one batch assembly (on arrays) equals a per-row reference kept here: BOS, EOS
insertion, truncation, drops, trained flags and counts, whatever the template, train_on,
truncation and tokenizer path."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from finetune.data import DataError
from finetune.data.encode import FastEncoder, OffsetEncoder
from finetune.data.encode.offsets import span_tokens_from_offsets
from finetune.data.encode.token_bytes import span_tokens, token_ends
from finetune.data.errors import RowOrigin
from finetune.data.formats import Example
from finetune.data.template import BUILTIN_CHAT_TEMPLATE
from finetune.data.tokenized import RowCounts, TokenizedRows

WORDS = ["alpha", " beta", "  ", "\n", "é", "中文", "42", "<|end|>", "\u2581", "", "x y z"]
# Like the tiny template, but assistant turns end with a newline: every trained turn needs an
# EOS inserted (an empty one too, whose span is empty).
NO_EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
                   "{{ m['content'] }}{{ '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def row_token_spans(encoder: OffsetEncoder, text: str, ids: list[int], enc,
                    spans) -> list[tuple[int, int, bool]]:
    """One row's token spans, row by row: byte lengths when the encoder uses them and the row's
    tokens spell it, else the offsets of an encoding that has them."""
    table = getattr(encoder, "_token_bytes", None)
    if table is not None:
        ends = token_ends(table, ids, text)
        if ends is not None:
            return [(*span_tokens(ends, text, a, b), needs_eos) for a, b, needs_eos in spans]
        enc = encoder._encoding_backend.encode(text, add_special_tokens=False)
    return [(*span_tokens_from_offsets(enc, a, b, len(text), len(ids)), needs_eos)
            for a, b, needs_eos in spans]


def insert_eos(ids: list[int], spans, origin: RowOrigin, eos: int | None):
    if eos is None:
        raise DataError(f"{origin}: the tokenizer has no EOS token to end an assistant turn; "
                        "set one on the tokenizer (eos_token)")
    out, shift, ids = [], 0, list(ids)
    for a, b, needs_eos in spans:
        a, b = a + shift, b + shift
        if needs_eos and not (b > a and ids[b - 1] == eos):
            ids.insert(b, eos)
            b += 1
            shift += 1
        out.append((a, b, False))
    return ids, out


def assemble_rows(encoder: OffsetEncoder, batch, encoded, counts: RowCounts) -> TokenizedRows:
    """The reference: the row rules applied one row at a time, in plain Python."""
    flat: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    offsets = [0]
    bos, max_len = encoder.bos, encoder.max_seq_len
    for text, spans, origin, enc in zip(batch.texts, batch.spans, batch.origins, encoded,
                                        strict=True):
        ids = list(enc.ids)
        spans = row_token_spans(encoder, text, ids, enc, spans)
        shift = 0
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
            shift = 1
        if any(needs_eos for _, _, needs_eos in spans):
            spans = [(a + shift, b + shift, e) for a, b, e in spans]
            ids, spans = insert_eos(ids, spans, origin, encoder.eos)
            shift = 0
        n = len(ids)
        cut = n > max_len
        if cut:
            if encoder.truncation == "error":
                raise DataError(f"{origin}: {n} tokens, longer than data.max_seq_len="
                                f"{max_len}; raise data.max_seq_len or set "
                                "data.truncation=truncate (cut) or drop (skip such rows)")
            if encoder.truncation == "drop":
                counts.dropped += 1
                continue
            n = max_len
            del ids[n:]
        base, kept = len(flat), len(starts)
        for a, b, _ in ((0, n - shift, False),) if encoder.train_all else spans:
            a, b = max(a + shift, 1), min(b + shift, n)  # the first token is never a target
            if b > a:
                starts.append(base + a)
                ends.append(base + b)
        if len(starts) == kept:
            counts.dropped += 1  # a cut row then dropped counts as dropped only
            continue
        counts.truncated += cut
        flat.extend(ids)
        offsets.append(len(flat))
    marks = np.zeros(len(flat) + 1, dtype=np.int32)
    np.add.at(marks, np.array(starts, dtype=np.int64), 1)
    np.add.at(marks, np.array(ends, dtype=np.int64), -1)
    return TokenizedRows(np.array(flat, dtype=np.int32), np.cumsum(marks[:-1]) > 0,
                         np.array(offsets, dtype=np.int64))


def random_example(rng: random.Random) -> Example:
    def text() -> str:
        return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))

    if rng.random() < 0.2:  # plain text: the EOS after it is always inserted
        return Example(segments=[(text(), False), (text(), True)])
    turns = [("system", text())] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        turns += [("user", text()), ("assistant", text())]
    return Example(messages=turns)


def make_encoder(tokenizer, template: str, path: str, **settings) -> OffsetEncoder:
    if path == "offsets":
        return OffsetEncoder(tokenizer, template, **settings)
    encoder = FastEncoder(tokenizer, template, **settings)
    encoder.warm_up()
    assert encoder._token_bytes is not None
    if path == "no_bos":  # a tokenizer without BOS (Qwen): none is added
        encoder.bos = None
    return encoder


def assembled(encoder: OffsetEncoder, items, *, reference: bool = False
              ) -> tuple[TokenizedRows, RowCounts]:
    """The rows and counts of one rendered, tokenized batch, by the package's assembly or by
    the reference."""
    batch = encoder._render(items, RowCounts())
    encoded = encoder._tokenize(batch.texts)
    counts = RowCounts()
    assemble = assemble_rows if reference else OffsetEncoder._assemble
    return assemble(encoder, batch, encoded, counts), counts


CASES = list(itertools.product(
    ["tokenizer", "builtin", "no_eos"], ["assistant", "all", "last_turn"], ["truncate", "drop"],
    [6, 20, 512], ["byte_lengths", "offsets", "no_bos"]))


@pytest.mark.parametrize("template,train_on,truncation,max_seq_len,path", CASES)
def test_assembly_equals_the_per_row_reference(tokenizer, template, train_on, truncation,
                                               max_seq_len, path):
    source = {"tokenizer": tokenizer.chat_template, "builtin": BUILTIN_CHAT_TEMPLATE,
              "no_eos": NO_EOS_TEMPLATE}[template]
    encoder = make_encoder(tokenizer, source, path, train_on=train_on, max_seq_len=max_seq_len,
                           truncation=truncation)
    rng = random.Random(hash((template, train_on, truncation, max_seq_len, path)) % 1000)
    items = [(random_example(rng), RowOrigin("t.jsonl", i + 1)) for i in range(120)]
    got, ours = assembled(encoder, items)
    want, theirs = assembled(encoder, items, reference=True)
    assert np.array_equal(got.offsets, want.offsets)
    assert np.array_equal(got.tokens, want.tokens) and got.tokens.dtype == want.tokens.dtype
    assert np.array_equal(got.trained, want.trained)
    assert ours.to_dict() == theirs.to_dict()
    if max_seq_len == 6:
        assert ours.truncated + ours.dropped > 0  # the case exercises truncation
    if max_seq_len == 512:
        assert len(got) > 100


def test_inserted_eos_moves_the_spans_after_it(tokenizer):
    """Every assistant turn of the no-EOS template gets one EOS, and the row keeps its text."""
    encoder = make_encoder(tokenizer, NO_EOS_TEMPLATE, "byte_lengths", max_seq_len=512)
    example = Example(messages=[("user", "1 + 1?"), ("assistant", "Two."),
                                ("user", "2 + 2?"), ("assistant", "Four.")])
    rows = encoder.encode([(example, RowOrigin("t.jsonl", 1))], RowCounts())
    ids, trained = rows.example(0)
    assert tokenizer.decode(ids[trained].tolist()) == "Two.<|end|>Four.<|end|>"
    assert int((ids == tokenizer.eos_token_id).sum()) == 2


def test_assembly_raises_like_the_reference_on_too_long_rows(tokenizer):
    encoder = OffsetEncoder(tokenizer, tokenizer.chat_template, max_seq_len=12,
                            truncation="error")
    items = [(Example(messages=[("user", "hi"), ("assistant", "ok")]), RowOrigin("t.jsonl", 1)),
             (Example(messages=[("user", "word " * 9), ("assistant", "yes")]),
              RowOrigin("t.jsonl", 2))]
    messages = []
    for reference in (False, True):
        with pytest.raises(DataError, match=r"^t.jsonl:2: \d+ tokens, longer than") as caught:
            assembled(encoder, items, reference=reference)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("long_first", [True, False])
def test_a_missing_eos_is_refused_in_row_order_like_the_reference(tokenizer, long_first):
    encoder = OffsetEncoder(tokenizer, NO_EOS_TEMPLATE, max_seq_len=12, truncation="error")
    encoder.eos = None  # a tokenizer without EOS: nothing to end the turn with
    long = (Example(segments=[("word " * 20, False), ("", False)]), RowOrigin("t.jsonl", 1))
    needs_eos = (Example(messages=[("user", "hi"), ("assistant", "ok")]), RowOrigin("t.jsonl", 2))
    items = [long, needs_eos] if long_first else [needs_eos, long]
    want = "longer than data.max_seq_len" if long_first else "has no EOS token"
    messages = []
    for reference in (False, True):
        with pytest.raises(DataError, match=want) as caught:
            assembled(encoder, items, reference=reference)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
