"""Token spans from token byte lengths, for fast tokenizers whose tokens spell the text.

With most current tokenizers (byte-level BPE as in Llama 3, Qwen, Mistral Tekken; metaspace BPE
with byte fallback as in the tiny model), the tokens of a text, read as the bytes they stand for,
concatenate back to exactly that text. Then each token's byte length locates it in the text, and
the tokenizer need not track offsets, which is about 45% of its time. `token_byte_lengths` says,
from the tokenizer's own description, whether it is such a design; every row is still checked
(its tokens must add up to its byte length, `token_ends`), and a row that fails takes the
offset-tracking encoder instead.
"""

from __future__ import annotations

import json
import unicodedata
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Any, NamedTuple

import numpy as np

# The length given to a token whose length is unknown (the unknown token, an ambiguous one). Every
# token stands for at least one byte, so a row holding one falls short of its text: it never
# adds up. No other token of an accepted design is counted short or long but a literal
# metaspace, which is counted short too; so a row adds up exactly when its tokens spell it.
UNKNOWN = 0

# Pre-tokenizers that only cut the text (none drops or adds a character); Split must keep its
# matches (behavior "Removed" drops them).
_CUTTING = {"Split", "Digits", "Punctuation", "UnicodeScripts"}


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's): printable bytes stand for themselves, the others for
    256 + their rank."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pieces(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [p for item in pre.get("pretokenizers", []) for p in _pieces(item)]
    return [pre]


def _spelling(spec: dict) -> tuple[str, str] | None:
    """How a token's string spells text: ("bytes", "") for the byte-level alphabet,
    ("metaspace", replacement) or ("plain", ""); None when the pre-tokenizers may add, drop or
    change characters."""
    kinds = []
    for pre in _pieces(spec.get("pre_tokenizer")):
        kind = pre.get("type")
        if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
            kinds.append(("bytes", ""))
        elif kind == "Metaspace" and pre.get("prepend_scheme", "always") == "never":
            kinds.append(("metaspace", pre.get("replacement", "\u2581")))
        elif kind not in _CUTTING or (kind == "Split" and pre.get("behavior") == "Removed") \
                or (kind == "Split" and pre.get("invert")):
            return None
    if len(kinds) > 1:
        return None
    return kinds[0] if kinds else ("plain", "")


class ByteTable(NamedTuple):
    lengths: list[int]  # text bytes of each token id (UNKNOWN for the unknown token)
    array: np.ndarray  # the same, as int64, for whole batches
    nfc: bool  # the tokenizer normalizes to NFC: a row must already be NFC


def token_byte_lengths(backend: Any) -> ByteTable | None:
    """For each token id, the number of text bytes it stands for; None unless the tokenizer is
    a design whose tokens spell the text (see the module). `backend` is a `tokenizers.Tokenizer`
    that will encode with `encode_batch_fast` and no special tokens added."""
    if not hasattr(backend, "encode_batch_fast"):
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if spec.get("normalizer") not in (None, {"type": "NFC"}) or model.get("type") != "BPE" \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    spelling = _spelling(spec)
    if spelling is None:
        return None
    kind, replacement = spelling
    decode = _byte_level_decoder() if kind == "bytes" else None
    vocab = backend.get_vocab(with_added_tokens=False)
    added = spec.get("added_tokens", [])
    lengths = [UNKNOWN] * (max([*vocab.values(), *(t["id"] for t in added), -1]) + 1)
    byte_pieces = set()
    for piece, i in vocab.items():
        if kind == "bytes":
            if any(c not in decode for c in piece):
                continue  # not a byte-level piece: leave it unknown
            n = len(piece)
        elif model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") \
                and piece.endswith(">"):
            n = 1
            byte_pieces.add(i)
        else:
            n = len((piece.replace(replacement, " ") if replacement else piece).encode())
        lengths[i] = n
    for token in added:
        if token.get("lstrip") or token.get("rstrip"):
            return None  # such tokens swallow the whitespace beside them
        # A byte piece that is also an added token stands for 1 byte or for its text: unknown.
        lengths[token["id"]] = (UNKNOWN if token["id"] in byte_pieces
                                else len(token["content"].encode()))
    unk = model.get("unk_token")
    if unk is not None and backend.token_to_id(unk) is not None:
        lengths[backend.token_to_id(unk)] = UNKNOWN
    return ByteTable(lengths, np.asarray(lengths, dtype=np.int64),
                     spec.get("normalizer") is not None)


def token_ends(table: ByteTable, ids: list[int], text: str) -> list[int] | None:
    """Cumulative byte ends of the tokens of `text`, or None when they do not spell it (the
    row then needs the offset-tracking encoder)."""
    if not ids:
        return None
    ends = list(accumulate(map(table.lengths.__getitem__, ids)))
    if text.isascii():
        return ends if ends[-1] == len(text) else None
    if table.nfc and not unicodedata.is_normalized("NFC", text):
        return None
    return ends if ends[-1] == len(text.encode()) else None


def span_tokens(ends: list[int], text: str, a: int, b: int) -> tuple[int, int]:
    """Token range [ta, tb) of the tokens that hold any character of text[a:b] (a token that
    straddles the start counts, as in offsets.span_tokens_from_offsets)."""
    n = len(ends)
    if b <= a:
        return n, n
    if not text.isascii():
        a, b = len(text[:a].encode()), len(text[:b].encode())
    return bisect_right(ends, a), min(bisect_left(ends, b) + 1, n)


def batch_span_tokens(table: ByteTable, flat: np.ndarray, row_starts: np.ndarray,
                      texts: list[str], spans: list
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`span_tokens` for every span of a batch at once. `flat` holds the rows' ids end to end,
    row k at flat[row_starts[k]:row_starts[k + 1]]; spans[k] lists row k's (a, b, needs_eos)
    character spans. Returns, one entry per span in row order, the row and the local token
    range [ta, tb), and per row whether its tokens spell its text (the spans of a row that does
    not are meaningless; it needs tracked offsets)."""
    sizes = np.diff(row_starts)
    before = np.zeros(len(flat) + 1, np.int64)
    np.cumsum(table.array[flat], out=before[1:])  # before[i]: bytes ahead of token i
    base = before[row_starts[:-1]]  # bytes ahead of each row
    n_bytes, rows, a_bytes, b_bytes = [], [], [], []
    for k, (text, row_spans) in enumerate(zip(texts, spans, strict=True)):
        if text.isascii():
            n_bytes.append(len(text))
            for a, b, _ in row_spans:
                rows.append(k)
                a_bytes.append(a)
                b_bytes.append(b if b > a else a)
        else:
            n_bytes.append(len(text.encode()) if not table.nfc
                           or unicodedata.is_normalized("NFC", text) else -1)
            for a, b, _ in row_spans:
                rows.append(k)
                a_bytes.append(len(text[:a].encode()))
                b_bytes.append(len(text[:b].encode()) if b > a else a_bytes[-1])
    spelled = (sizes > 0) & (before[row_starts[1:]] - base == np.array(n_bytes, np.int64))
    row = np.array(rows, np.int64)
    a = np.array(a_bytes, np.int64) + base[row]
    b = np.array(b_bytes, np.int64) + base[row]
    ends = before[1:]
    ta = np.searchsorted(ends, a, "right") - row_starts[row]
    tb = np.minimum(np.searchsorted(ends, b, "left") + 1 - row_starts[row], sizes[row])
    empty = b <= a
    ta[empty] = tb[empty] = sizes[row][empty]
    return row, ta, tb, spelled
