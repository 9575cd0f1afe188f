"""data.max_seq_len=auto: the row length that covers 99% of the data, within the model's context.

Rows are first encoded with the model's context as their limit; `choose_max_seq_len` then
picks the length and `cut_rows` applies data.truncation to the rows above it, with the same
result as encoding with that length in the first place: a cut row keeps its first tokens and
their trained flags, and a row left with no trained token is dropped. `warn_if_many_cut` warns
when more than 1% of the rows read were cut or dropped, naming the key to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from finetune.config.data import Truncation
from finetune.data.tokenized import RowCounts, TokenizedRows

logger = logging.getLogger(__name__)

AUTO = "auto"
COVERAGE = 0.99  # share of rows that fit whole
ROUND_TO = 64  # lengths are rounded up to a multiple of this
UNKNOWN_CONTEXT = 8192  # the cap when the model's context length is not known
CUT_WARN_SHARE = 0.01


@dataclass(frozen=True)
class LengthChoice:
    """The max_seq_len in force and where it came from (printed by `data inspect`)."""

    length: int
    source: str


def choose_max_seq_len(lengths: np.ndarray, cap: int, truncation: str) -> LengthChoice:
    """The length for data.max_seq_len=auto: 99% of `lengths` fit (all of them with
    truncation=error), rounded up to a multiple of 64, at most `cap` (the model's context)."""
    if not len(lengths):
        return LengthChoice(min(ROUND_TO, cap), f"auto: no rows; {min(ROUND_TO, cap)}")
    if truncation == Truncation.error:
        need, what = int(lengths.max()), "every row fits"
    else:
        fit = max(1, int(np.ceil(COVERAGE * len(lengths))))  # rows that must fit whole
        need = int(np.partition(lengths, fit - 1)[fit - 1])
        what = f"{COVERAGE:.0%} of rows fit"
    length = min(cap, max(2, -(-need // ROUND_TO) * ROUND_TO))
    capped = " (the model's context)" if length == cap and need > cap else ""
    return LengthChoice(length, f"auto: {what} in {need} tokens; {length} after rounding up to "
                                f"a multiple of {ROUND_TO}, at most {cap}{capped}")


def cut_rows(rows: TokenizedRows, length: int, truncation: str,
             counts: RowCounts) -> TokenizedRows:
    """`rows` under max_seq_len=`length` (data.truncation: truncate or drop; rows longer than
    `length` never exist with error); what was cut or dropped is added to `counts`."""
    lengths = rows.lengths
    over = lengths > length
    if not over.any():
        return rows
    starts = rows.offsets[:-1]
    keep = np.ones(len(rows), bool)
    if truncation == Truncation.drop:
        keep &= ~over
        counts.dropped += int(over.sum())
        kept_lengths = lengths
    else:
        kept_lengths = np.minimum(lengths, length)
        counts.truncated += int(over.sum())
        for i in np.flatnonzero(over):  # a cut row with no trained token left is dropped
            a = int(starts[i])
            if not rows.trained[a:a + length].any():
                keep[i] = False
                counts.dropped += 1
    index = np.flatnonzero(keep)
    n = kept_lengths[index]
    offsets = np.zeros(len(index) + 1, np.int64)
    np.cumsum(n, out=offsets[1:])
    gather = np.repeat(starts[index] - offsets[:-1], n) + np.arange(offsets[-1], dtype=np.int64)
    return TokenizedRows(rows.tokens[gather], rows.trained[gather], offsets)


def warn_if_many_cut(counts: RowCounts, length: int, source: str) -> None:
    """Warn when more than 1% of the rows read were truncated or dropped."""
    cut = counts.truncated + counts.dropped
    if counts.read and cut / counts.read > CUT_WARN_SHARE:
        key = ("data.max_seq_len=auto (or a larger number)" if not source.startswith(AUTO)
               else "data.max_seq_len=N with a larger N")
        logger.warning("%d of %d rows (%.1f%%) do not fit data.max_seq_len=%d (%s): %d "
                       "truncated, %d dropped. To keep them whole, set %s.", cut, counts.read,
                       100 * cut / counts.read, length, source, counts.truncated,
                       counts.dropped, key)
