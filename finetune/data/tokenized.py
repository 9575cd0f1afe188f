"""Examples to token ids and trained flags, in batches, with BOS/EOS and truncation rules.

Each rendered text is tokenized once with the fast tokenizer's batch encoder (no special tokens
added by the tokenizer); trained character spans become token ranges through the encoding's
character-to-token map. BOS is prepended once when the tokenizer has one and the template did
not already put it there; an EOS is inserted after any trained turn that lacks one. The first
token of every example is never a target (the model shifts labels, so nothing predicts it), which
also keeps packed documents from learning across their boundary.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import Example
from finetune.data.template import ChatRenderer

logger = logging.getLogger(__name__)

TRUNCATION = ("truncate", "drop", "error")
ON_BAD_ROW = ("error", "skip")


@dataclass
class TokenizedRows:
    """Token ids and trained flags of many examples, stored flat; example i is
    `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray  # int32
    trained: np.ndarray  # bool
    offsets: np.ndarray  # int64, len n + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.trained[a:b]

    def select(self, indices: np.ndarray) -> TokenizedRows:
        """The examples at `indices`, in that order (copies)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = (np.repeat(self.offsets[:-1][indices] - offsets[:-1], lengths)
                  + np.arange(offsets[-1], dtype=np.int64))
        return TokenizedRows(self.tokens[gather], self.trained[gather], offsets)

    @classmethod
    def empty(cls) -> TokenizedRows:
        return cls(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(1, np.int64))

    @classmethod
    def concat(cls, parts: list[TokenizedRows]) -> TokenizedRows:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]]
                                 + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
        return cls(np.concatenate([p.tokens for p in parts]),
                   np.concatenate([p.trained for p in parts]), offsets)


@dataclass
class RowCounts:
    """What happened to the rows read: skipped (by reason), truncated, dropped."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    dropped: int = 0
    first_skips: list[str] = field(default_factory=list)

    def merge(self, other: RowCounts) -> None:
        self.read += other.read
        self.skipped.update(other.skipped)
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.first_skips.extend(other.first_skips[: max(0, 5 - len(self.first_skips))])

    def to_dict(self) -> dict:
        return {"read": self.read, "skipped": dict(self.skipped), "truncated": self.truncated,
                "dropped": self.dropped, "first_skips": self.first_skips}

    @classmethod
    def from_dict(cls, d: dict) -> RowCounts:
        return cls(d["read"], Counter(d["skipped"]), d["truncated"], d["dropped"],
                   list(d["first_skips"]))


def reject(bad: BadRow, origin: RowOrigin, counts: RowCounts, on_bad_row: str) -> None:
    """Raise a located DataError, or count the row as skipped (data.on_bad_row=skip)."""
    if on_bad_row != "skip":
        raise bad.at(origin)
    counts.skipped[bad.reason] += 1
    if len(counts.first_skips) < 5:
        counts.first_skips.append(f"{origin}: {bad.message}")
        logger.warning("skipping %s: %s", origin, bad.message)


def _backend(tokenizer: Any):
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


def _first_token_from(enc: Any, char: int, n_chars: int, n_tokens: int) -> int:
    """Index of the first token that starts at or after character `char`."""
    while char < n_chars:
        t = enc.char_to_token(char)
        if t is not None:
            return t if enc.token_to_chars(t)[0] >= char else t + 1
        char += 1
    return n_tokens


class ExampleEncoder:
    """Turns batches of (Example, origin) into TokenizedRows; bad rows raise or are counted."""

    def __init__(self, tokenizer: Any, renderer: ChatRenderer, *, max_seq_len: int,
                 truncation: str = "truncate", on_bad_row: str = "error") -> None:
        if truncation not in TRUNCATION:
            raise DataError(f"data.truncation={truncation!r} is not one of {', '.join(TRUNCATION)}")
        if on_bad_row not in ON_BAD_ROW:
            raise DataError(f"data.on_bad_row={on_bad_row!r} is not one of {', '.join(ON_BAD_ROW)}")
        if max_seq_len < 2:
            raise DataError(f"data.max_seq_len={max_seq_len} is too small; use at least 2")
        self.tokenizer, self.renderer = tokenizer, renderer
        self.max_seq_len, self.truncation, self.on_bad_row = max_seq_len, truncation, on_bad_row
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.backend = _backend(tokenizer)
        self.train_all = renderer.train_on == "all"

    def _encode_texts(self, texts: list[str]) -> list[tuple[list[int], Any]]:
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e) for e in encodings]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(list(i), None) for i in ids]

    def _token_spans(self, text: str, ids: list[int], enc: Any, spans) -> list:
        n_chars, n_tokens = len(text), len(ids)
        if enc is not None:
            return [(_first_token_from(enc, a, n_chars, n_tokens),
                     _first_token_from(enc, b, n_chars, n_tokens), needs_eos)
                    for a, b, needs_eos in spans]
        # A tokenizer without offsets: count the tokens of each prefix.
        def count(char: int) -> int:
            if char >= n_chars:
                return n_tokens
            return len(self.tokenizer(text[:char], add_special_tokens=False)["input_ids"])
        return [(count(a), count(b), needs_eos) for a, b, needs_eos in spans]

    def encode(self, items: list[tuple[Example, RowOrigin]], counts: RowCounts) -> TokenizedRows:
        rendered, origins = [], []
        for example, origin in items:
            try:
                rendered.append(self.renderer.render(example))
                origins.append(origin)
            except BadRow as bad:
                reject(bad, origin, counts, self.on_bad_row)
        if not rendered:
            return TokenizedRows.empty()
        encoded = self._encode_texts([r.text for r in rendered])
        flat: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        offsets = [0]
        for r, origin, (ids, enc) in zip(rendered, origins, encoded, strict=True):
            spans = self._token_spans(r.text, ids, enc, r.spans)
            if self.bos is not None and (not ids or ids[0] != self.bos):
                ids = [self.bos, *ids]
                spans = [(a + 1, b + 1, e) for a, b, e in spans]
            ids, spans = self._insert_eos(ids, spans, origin)
            n = len(ids)
            if n > self.max_seq_len:
                if self.truncation == "error":
                    raise DataError(f"{origin}: {n} tokens, longer than data.max_seq_len="
                                    f"{self.max_seq_len}; raise data.max_seq_len or set "
                                    "data.truncation=truncate (cut) or drop (skip such rows)")
                if self.truncation == "drop":
                    counts.dropped += 1
                    continue
                n = self.max_seq_len
                ids = ids[:n]
                counts.truncated += 1
            trained = [(0, n)] if self.train_all else [(a, min(b, n)) for a, b, _ in spans]
            trained = [(max(a, 1), b) for a, b in trained if b > max(a, 1)]
            if not trained:
                counts.dropped += 1
                logger.debug("%s: no trained tokens left after truncation; dropped", origin)
                continue
            base = len(flat)
            flat.extend(ids)
            for a, b in trained:
                starts.append(base + a)
                ends.append(base + b)
            offsets.append(len(flat))
        return _pack_rows(flat, starts, ends, offsets)

    def _insert_eos(self, ids: list[int], spans, origin: RowOrigin):
        if not any(needs_eos for _, _, needs_eos in spans):
            return ids, spans
        if self.eos is None:
            raise DataError(f"{origin}: the tokenizer has no EOS token to end an assistant turn; "
                            "set one on the tokenizer (eos_token)")
        out, shift, ids = [], 0, list(ids)
        for a, b, needs_eos in spans:
            a, b = a + shift, b + shift
            if needs_eos and not (b > a and ids[b - 1] == self.eos):
                ids.insert(b, self.eos)
                b += 1
                shift += 1
            out.append((a, b, False))
        return ids, out


def _pack_rows(flat: list[int], starts: list[int], ends: list[int],
               offsets: list[int]) -> TokenizedRows:
    tokens = np.array(flat, dtype=np.int32)
    marks = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.add.at(marks, np.array(starts, dtype=np.int64), 1)
    np.add.at(marks, np.array(ends, dtype=np.int64), -1)
    trained = np.cumsum(marks[:-1]) > 0
    return TokenizedRows(tokens, trained, np.array(offsets, dtype=np.int64))
