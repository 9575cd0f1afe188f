"""Token spans from token byte lengths (no offset tracking) equal those from tracked offsets,
for every tokenizer design the path accepts; other designs, and rows whose tokens do not spell
them, take the offset path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from finetune.data.encode import Encoder, FastEncoder, OffsetEncoder
from finetune.data.encode.offsets import span_tokens_from_offsets
from finetune.data.encode.token_bytes import span_tokens, token_byte_lengths, token_ends
from finetune.data.errors import RowOrigin
from finetune.data.formats import Example
from finetune.data.template import BUILTIN_CHAT_TEMPLATE
from finetune.data.tokenized import RowCounts

CORPUS = ["The quick brown fox jumps over the lazy dog.", "naïve café, déjà vu; 中文 and 🙂",
          "def f(x):\n\treturn x * 2  # twice", "1234 + 5678 = 6912", "  leading and trailing  "]
SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
PIECES = ["alpha", " beta", "  ", "\n", "\t", "é", "中", "🙂", "42", "<s>", "</s>", "<|user|>",
          "x_y", "Ω", ".", " "]
RARE = ["\u2581", "<0x41>"]  # pieces that make a metaspace tokenizer's tokens misspell the text


def byte_level(*, add_prefix_space: bool = False, normalizer=None) -> Tokenizer:
    """A Llama 3 / Qwen-like byte-level BPE (GPT-2 regex split, then bytes)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s?\p{L}+|\s?\p{N}+|\s?[^\s\p{L}\p{N}]+|\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def metaspace(prepend_scheme: str = "never", *, byte_fallback: bool = True,
              added_bytes: bool = False) -> Tokenizer:
    """A SentencePiece-like BPE (the tiny model's design, or Llama 2's with "first"); with
    `added_bytes`, its byte pieces are also added tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback, unk_token=None
                               if byte_fallback else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=SPECIALS + ([] if byte_fallback else ["<unk>"])
        + [f"<0x{b:02X}>" for b in range(256)]))
    if added_bytes:
        return tok
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return Tokenizer.from_str(json.dumps(spec))


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(RARE if rng.random() < 0.02 else PIECES)
                   for _ in range(rng.randint(0, 12)))


def assert_spans_match(tok: Tokenizer, table, text: str) -> bool:
    """Checks every span start and end; returns whether the byte-length path took the row."""
    enc = tok.encode(text, add_special_tokens=False)
    (fast,) = tok.encode_batch_fast([text], add_special_tokens=False)
    assert fast.ids == enc.ids
    ends = token_ends(table, enc.ids, text)
    if ends is None:
        return False
    n, t = len(text), len(enc.ids)
    for p in range(n + 1):
        assert span_tokens(ends, text, p, n) == span_tokens_from_offsets(enc, p, n, n, t), (text, p)
        assert span_tokens(ends, text, 0, p) == span_tokens_from_offsets(enc, 0, p, n, t), (text, p)
    return True


DESIGNS = {"byte_level": byte_level, "metaspace": metaspace,
           "nfc_byte_level": lambda: byte_level(normalizer=normalizers.NFC()),
           "metaspace_without_fallback": lambda: metaspace(byte_fallback=False),
           "metaspace_added_bytes": lambda: metaspace(added_bytes=True)}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_spans_from_byte_lengths_equal_tracked_offsets(design):
    tok = DESIGNS[design]()
    table = token_byte_lengths(tok)
    assert table is not None and table.nfc == (design == "nfc_byte_level")
    rng = random.Random(0)
    taken = [assert_spans_match(tok, table, random_text(rng)) for _ in range(300)]
    assert sum(taken) > 100  # most rows take the byte-length path...
    assert not all(taken)  # ...and some (a literal "\u2581", an unknown token, "") do not


def test_rows_that_do_not_spell_their_text_are_caught():
    for design, text in [("metaspace", "a\u2581b"),  # a literal metaspace
                         ("metaspace", ""),  # no tokens at all
                         ("metaspace_without_fallback", "\u03a9"),  # an unknown token
                         ("metaspace_added_bytes", "\u03a9")]:  # byte pieces read as text
        tok = DESIGNS[design]()
        assert token_ends(token_byte_lengths(tok), tok.encode(text).ids, text) is None
    tok = metaspace()
    for text in ["<0x41>", "\u03a9"]:  # the tiny model's design spells both
        assert token_ends(token_byte_lengths(tok), tok.encode(text).ids, text) is not None
    text = "cafe\u0301"  # not NFC: under an NFC normalizer the text changes
    nfc = byte_level(normalizer=normalizers.NFC())
    assert token_ends(token_byte_lengths(nfc), nfc.encode(text).ids, text) is None


def with_added_lstrip() -> Tokenizer:
    tok = byte_level()
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    return tok


def with_removing_split() -> Tokenizer:
    tok = byte_level()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.ByteLevel(use_regex=False)])
    return tok


@pytest.mark.parametrize("make", [
    lambda: metaspace("first"),  # prepends a metaspace the text does not have
    lambda: byte_level(add_prefix_space=True),
    lambda: byte_level(normalizer=normalizers.Lowercase()),
    with_added_lstrip,
    with_removing_split,
], ids=["metaspace_first", "prefix_space", "lowercase", "lstrip_token", "removed_split"])
def test_designs_that_change_the_text_track_offsets(make):
    assert token_byte_lengths(make()) is None


def _encoder(tok: Tokenizer, *, fast: bool) -> Encoder:
    """The fast encoder (asserting that it takes the byte-length path) or the plain one."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if not fast:
        return OffsetEncoder(wrapped, BUILTIN_CHAT_TEMPLATE, max_seq_len=64)
    encoder = FastEncoder(wrapped, BUILTIN_CHAT_TEMPLATE, max_seq_len=64)
    encoder.warm_up()
    assert encoder._token_bytes is not None  # the design qualifies
    return encoder


@pytest.mark.parametrize("design", ["byte_level", "metaspace"])
def test_fast_encoder_gives_the_rows_of_the_plain_one(design):
    tok = byte_level() if design == "byte_level" else metaspace()
    rng = random.Random(1)
    items = []
    for i in range(150):
        turns = [("user", random_text(rng)), ("assistant", random_text(rng))]
        if i % 3 == 0:
            turns += [("user", random_text(rng)), ("assistant", random_text(rng))]
        items.append((Example(messages=turns), RowOrigin("t.jsonl", i + 1)))
    rows, counts = [], []
    for fast in (True, False):
        counts.append(RowCounts())
        rows.append(_encoder(tok, fast=fast).encode(items, counts[-1]))
    ours, theirs = rows
    assert len(ours) == len(theirs) > 100
    for got, want in zip((ours.tokens, ours.trained, ours.offsets),
                         (theirs.tokens, theirs.trained, theirs.offsets), strict=True):
        assert np.array_equal(got, want)
    assert counts[0].to_dict() == counts[1].to_dict()


def test_the_tiny_tokenizer_encodes_without_offsets(tokenizer):
    encoder = FastEncoder(tokenizer, tokenizer.chat_template, max_seq_len=64)
    encoder.warm_up()
    assert encoder._token_bytes is not None
    # Its byte pieces are vocabulary, not added tokens: the literal text is not a byte.
    assert tokenizer("<0x41>", add_special_tokens=False)["input_ids"] != \
        tokenizer.convert_tokens_to_ids(["<0x41>"])
