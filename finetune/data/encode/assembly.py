"""Batch assembly: token ids and trained token ranges -> TokenizedRows, for every encoder.

The one place the row rules are applied. BOS is prepended once when the tokenizer has one and a
row does not already start with it. An EOS is inserted at the end of each trained span that asks
for one (`needs_eos`: the template did not close the turn with EOS) unless the span's last token
is EOS already. A row longer than max_seq_len is cut, dropped or refused (data.truncation). The
first token of every example is never a target (the model shifts labels, so nothing predicts
it), which also keeps packed documents from learning across their boundary; a row left with no
trained token is dropped. Whole batches are done at once on numpy arrays; only the rows with an
EOS to insert are visited one by one, since each insertion moves the spans after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain
from typing import NoReturn

import numpy as np

from finetune.data.errors import DataError, RowOrigin
from finetune.data.tokenized import RowCounts, TokenizedRows

logger = logging.getLogger(__name__)

# (start, end, needs_eos) character spans of one rendered row (template.Rendered.spans)
CharSpans = tuple[tuple[int, int, bool], ...]


@dataclass
class TokenBatch:
    """A batch as the tokenizer gave it, before the row rules.

    Row k's ids are `flat[row_starts[k]:row_starts[k + 1]]` (no special tokens added). Span j
    (the spans of a row together, rows in order) is the token range [ta[j], tb[j]) of row
    `row[j]`, counted in that row's own ids; `needs_eos[j]` says an EOS must end it (None: no
    span of the batch needs one).
    """

    flat: np.ndarray  # int64
    row_starts: np.ndarray  # int64, len rows + 1
    row: np.ndarray  # int64
    ta: np.ndarray  # int64
    tb: np.ndarray  # int64
    needs_eos: np.ndarray | None  # bool
    origins: list[RowOrigin]


def flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' ids end to end (int64) and where each row starts (len rows + 1)."""
    sizes = np.fromiter(map(len, ids), np.int64, len(ids))
    row_starts = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(sizes, out=row_starts[1:])
    return np.fromiter(chain.from_iterable(ids), np.int64, int(row_starts[-1])), row_starts


def eos_flags(spans: list[CharSpans]) -> np.ndarray | None:
    """`needs_eos` of every span of a batch, rows in order; None when no span needs an EOS."""
    if not any(needs_eos for row in spans for _, _, needs_eos in row):
        return None
    return np.fromiter((needs_eos for row in spans for _, _, needs_eos in row), bool)


def assemble(batch: TokenBatch, counts: RowCounts, *, bos: int | None, eos: int | None,
             max_seq_len: int, truncation: str, train_all: bool) -> TokenizedRows:
    """The batch's rows under the row rules (see the module), in order, without the dropped
    ones; truncated and dropped rows are added to `counts`. Raises DataError for the first row
    (in batch order) longer than max_seq_len with truncation="error", or that needs an EOS when
    the tokenizer has none."""
    m = len(batch.origins)
    if m == 0:
        return TokenizedRows.empty()
    flat, row_starts, row, ta, tb = batch.flat, batch.row_starts, batch.row, batch.ta, batch.tb
    sizes = np.diff(row_starts)
    shift = np.zeros(m, np.int64)  # 1 where BOS goes in front (decided on the tokenizer's ids)
    if bos is not None:
        first = np.full(m, -1, np.int64)
        first[sizes > 0] = flat[row_starts[:-1][sizes > 0]]
        shift[first != bos] = 1
    if batch.needs_eos is not None:
        if eos is None:
            _refuse_missing_eos(batch, sizes + shift, max_seq_len, truncation)
        flat, row_starts, ta, tb = _insert_eos(batch, eos)
        sizes = np.diff(row_starts)
    n = sizes + shift
    keep = np.ones(m, bool)
    over = n > max_seq_len
    if over.any():
        k = int(np.flatnonzero(over)[0])
        if truncation == "error":
            _refuse_too_long(batch.origins[k], int(n[k]), max_seq_len)
        if truncation == "drop":
            keep &= ~over
            counts.dropped += int(over.sum())
        else:
            n = np.minimum(n, max_seq_len)
    if train_all:
        row = np.arange(m)
        a, b = np.ones(m, np.int64), n
    else:  # the first token is never a target
        a = np.maximum(ta + shift[row], 1)
        b = np.minimum(tb + shift[row], n[row])
    live = (b > a) & keep[row]
    trained_rows = np.zeros(m, bool)
    trained_rows[row[live]] = True
    for k in np.flatnonzero(keep & ~trained_rows):
        counts.dropped += 1
        logger.debug("%s: no trained tokens left after truncation; dropped", batch.origins[k])
    keep &= trained_rows
    counts.truncated += int((over & keep).sum())  # a cut row then dropped counts as dropped only

    kept = np.flatnonzero(keep)
    out_starts = np.zeros(m, np.int64)  # each kept row's first token in the output
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(n[kept], out=offsets[1:])
    out_starts[kept] = offsets[:-1]
    source = (np.arange(offsets[-1], dtype=np.int64)
              + np.repeat(row_starts[kept] - offsets[:-1] - shift[kept], n[kept]))
    tokens = flat.take(source, mode="clip").astype(np.int32)  # BOS places: set next
    if bos is not None:
        tokens[offsets[:-1][shift[kept] == 1]] = bos
    marks = np.zeros(len(tokens) + 1, np.int32)
    np.add.at(marks, out_starts[row[live]] + a[live], 1)
    np.add.at(marks, out_starts[row[live]] + b[live], -1)
    return TokenizedRows(tokens, np.cumsum(marks[:-1]) > 0, offsets)


def _insert_eos(batch: TokenBatch,
                eos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ids, row starts and span ranges once an EOS ends each span that needs one. A row's
    spans are taken in order and each insertion moves every later span of the row one token
    right. Spans come in text order, except that an empty span maps to the row's end: its EOS
    goes there and still moves the spans after it (kept exactly as the per-row rules had it)."""
    flat, starts, needs_eos = batch.flat, batch.row_starts, batch.needs_eos
    assert needs_eos is not None
    ta, tb = batch.ta.tolist(), batch.tb.tolist()
    # Row k's spans are [first_span[k], first_span[k + 1]).
    first_span = np.searchsorted(batch.row, np.arange(len(starts))).tolist()
    sizes = np.diff(starts)
    pieces: list[np.ndarray] = []
    copied = 0  # rows before this one are taken as they are
    for k in np.unique(batch.row[needs_eos]).tolist():
        ids = flat[starts[k]:starts[k + 1]].tolist()
        inserted = 0
        for j in range(first_span[k], first_span[k + 1]):
            a, b = ta[j] + inserted, tb[j] + inserted
            if needs_eos[j] and not (b > a and ids[b - 1] == eos):
                ids.insert(b, eos)
                b += 1
                inserted += 1
            ta[j], tb[j] = a, b
        pieces += [flat[starts[copied]:starts[k]], np.array(ids, np.int64)]
        sizes[k] = len(ids)
        copied = k + 1
    pieces.append(flat[starts[copied]:])
    row_starts = np.zeros(len(starts), np.int64)
    np.cumsum(sizes, out=row_starts[1:])
    return np.concatenate(pieces), row_starts, np.array(ta, np.int64), np.array(tb, np.int64)


def _refuse_too_long(origin: RowOrigin, n: int, max_seq_len: int) -> NoReturn:
    raise DataError(f"{origin}: {n} tokens, longer than data.max_seq_len={max_seq_len}; raise "
                    "data.max_seq_len or set data.truncation=truncate (cut) or drop (skip such "
                    "rows)")


def _refuse_missing_eos(batch: TokenBatch, n: np.ndarray, max_seq_len: int,
                        truncation: str) -> NoReturn:
    """The tokenizer has no EOS to insert: name the first row that needs one, unless a row before
    it is too long with truncation="error" (rows are refused in batch order)."""
    assert batch.needs_eos is not None
    k = int(batch.row[np.flatnonzero(batch.needs_eos)[0]])
    if truncation == "error":
        over = np.flatnonzero(n[:k] > max_seq_len)
        if len(over):
            _refuse_too_long(batch.origins[over[0]], int(n[over[0]]), max_seq_len)
    raise DataError(f"{batch.origins[k]}: the tokenizer has no EOS token to end an assistant turn; "
                    "set one on the tokenizer (eos_token)")
