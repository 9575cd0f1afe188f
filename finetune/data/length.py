"""data.max_seq_len=auto: the row length that covers 99% of the data, within the model's context.

Rows are first encoded with the model's context as their limit; `choose_max_seq_len` then
picks the length and `cut_rows` applies data.truncation to the rows above it, with the same
result as encoding with that length in the first place: a cut row keeps its first tokens and
their trained flags, and a row left with no trained token is dropped. `warn_if_many_cut` warns
when more than 1% of the rows read were cut or dropped, naming the key to change. Each row read
is counted once: truncated (cut and kept) or dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from finetune.config.data import Truncation
from finetune.data.errors import DataError
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
    if not len(lengths):  # nothing fit: the rows were read at the cap, and that is what applied
        return LengthChoice(cap, f"auto: no usable row within {cap} tokens, the most it may choose")
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


def check_length_fits(max_seq_len: int | str, context: int | None) -> None:
    """Refuse a data.max_seq_len longer than the model's `context` (its max_position_embeddings)
    with a DataError naming both numbers; auto, or a model that does not say, always passes."""
    if max_seq_len == AUTO or context is None or int(max_seq_len) <= context:
        return
    raise DataError(f"data.max_seq_len={max_seq_len} is longer than the model's context "
                    f"({context} tokens, its max_position_embeddings): positions past it were "
                    f"never trained, or do not exist. Set data.max_seq_len={context} or less, or "
                    "data.max_seq_len=auto (99% of rows fit, within the context).")


def cut_rows(rows: TokenizedRows, length: int, truncation: str,
             counts: RowCounts) -> TokenizedRows:
    """`rows` under max_seq_len=`length` (data.truncation: truncate or drop; rows longer than
    `length` never exist with error). `counts` are those of `rows` as encoded with a longer
    limit (the model's context); they are updated so that each row read is counted once: a row
    over `length` and kept is truncated, one removed is dropped (see `recount_cut`)."""
    lengths = rows.lengths
    over = lengths > length
    if not over.any():
        return rows
    starts = rows.offsets[:-1]
    keep = np.ones(len(rows), bool)
    if truncation == Truncation.drop:
        keep &= ~over
        kept_lengths = lengths
    else:
        kept_lengths = np.minimum(lengths, length)
        for i in np.flatnonzero(over):  # a cut row with no trained token left is dropped
            a = int(starts[i])
            if not rows.trained[a:a + length].any():
                keep[i] = False
    recount_cut(counts, kept_over=int((over & keep).sum()), removed=int((~keep).sum()))
    index = np.flatnonzero(keep)
    n = kept_lengths[index]
    offsets = np.zeros(len(index) + 1, np.int64)
    np.cumsum(n, out=offsets[1:])
    gather = np.repeat(starts[index] - offsets[:-1], n) + np.arange(offsets[-1], dtype=np.int64)
    return TokenizedRows(rows.tokens[gather], rows.trained[gather], offsets)


def recount_cut(counts: RowCounts, *, kept_over: int, removed: int) -> None:
    """Update `counts` of rows (or pairs) encoded with a longer limit after cutting them again:
    those truncated then are all over the new length, so the truncated count becomes the
    `kept_over` units and the `removed` ones are added to the dropped."""
    counts.truncated = kept_over
    counts.dropped += removed


def warn_if_many_cut(counts: RowCounts, length: int, source: str, *, context: int | None = None,
                     unit: str = "rows") -> None:
    """Warn when more than 1% of the `unit` read (rows, or pairs) were truncated or dropped,
    with a fix that exists: a larger data.max_seq_len only up to the model's `context`, and for
    rows cut at the context itself, what helps instead."""
    cut = counts.truncated + counts.dropped
    if not counts.read or cut / counts.read <= CUT_WARN_SHARE:
        return
    if context is not None and length >= context:
        fix = (f"They are longer than the model's context ({context} tokens), so no larger "
               "data.max_seq_len can hold them: shorten or split them, leave them out "
               "(data.truncation=drop), or use a model with a longer context.")
    else:
        most = f", at most {context}, the model's context" if context is not None else ""
        key = ("data.max_seq_len=auto (or a larger number" if not source.startswith(AUTO)
               else "data.max_seq_len=N (a larger N")
        fix = f"To keep them whole, set {key}{most})."
    logger.warning("%d of %d %s (%.1f%%) do not fit data.max_seq_len=%d (%s): %d truncated, "
                   "%d dropped. %s", cut, counts.read, unit, 100 * cut / counts.read, length,
                   source, counts.truncated, counts.dropped, fix)


def context_hint(counts: RowCounts, length: int, context: int | None, *,
                 unit: str = "rows") -> str:
    """For an error about rows dropped at `length`: when that is the model's whole `context`,
    a sentence saying that no larger data.max_seq_len exists and what helps instead."""
    if not counts.dropped or context is None or length < context:
        return ""
    return (f" The {counts.dropped} dropped {unit} do not fit, with a trained token, in the "
            f"model's context ({context} tokens), and no larger data.max_seq_len exists: "
            "shorten them (their prompts above all), or use a model with a longer context.")
