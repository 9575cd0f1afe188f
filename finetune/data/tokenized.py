"""Tokenized examples stored flat, and the tally of what happened to the rows read.

`TokenizedRows` is what every encoder produces and what the sampler, the streaming buffers and
the cache hold: token ids and trained flags of many examples end to end, with offsets.
`RowCounts` counts rows read, skipped (by reason), truncated and dropped; `reject` turns a bad
row into a located DataError or a counted skip (data.on_bad_row).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from finetune.data.errors import BadRow, RowOrigin

logger = logging.getLogger(__name__)


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
