"""Examples to token ids and trained flags, in batches, with BOS/EOS and truncation rules.

Each rendered text is tokenized once with the fast tokenizer's batch encoder (no special tokens
added by the tokenizer); trained character spans become token ranges through the encoding's
character-to-token map. BOS is prepended once when the tokenizer has one and the template did
not already put it there; an EOS is inserted after any trained turn that lacks one. The first
token of every example is never a target (the model shifts labels, so nothing predicts it), which
also keeps packed documents from learning across their boundary.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import Example
from finetune.data.template import ChatRenderer
from finetune.data.token_bytes import (
    ByteTable,
    batch_span_tokens,
    span_tokens,
    token_byte_lengths,
    token_ends,
)

logger = logging.getLogger(__name__)

TRUNCATION = ("truncate", "drop", "error")
TOKENIZE_CHUNK = 128  # rows per tokenizer call: small enough to share a batch between threads
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


def _without_template_processing(backend: Any) -> Any:
    """A private copy of the fast tokenizer without its post-processor when that is a
    TemplateProcessing (what transformers installs to add BOS/EOS): asked for no special tokens,
    it changes neither ids nor offsets, yet rebuilding every encoding through it costs 5-10% of
    the tokenizer's time. Other post-processors (ByteLevel offset trimming, ...) are kept."""
    from tokenizers import Tokenizer, processors

    if not isinstance(backend.post_processor, processors.TemplateProcessing):
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    return copy


def _token_at(enc: Any, char: int, end: int) -> tuple[int, int] | None:
    """(index, start char) of the token holding the first mapped character in [char, end)."""
    while char < end:
        t = enc.char_to_token(char)
        if t is not None:
            return t, enc.token_to_chars(t)[0]
        char += 1
    return None


def _span_tokens(enc: Any, a: int, b: int, n_chars: int, n_tokens: int) -> tuple[int, int]:
    """Token range [ta, tb) of the tokens that hold any character of text[a:b]. A token that
    straddles the start is trained: it is what the model must emit to begin the turn (e.g.
    "\u2581Sure" after a prompt ending in a space)."""
    if b <= a:
        return n_tokens, n_tokens
    ta = enc.char_to_token(a)
    if ta is None:  # a character the tokenizer dropped (or no token at all)
        first = _token_at(enc, a, b)
        if first is None:
            return n_tokens, n_tokens
        ta = first[0]
    last = enc.char_to_token(b) if b < n_chars else None
    if last is None:
        found = _token_at(enc, b, n_chars)
        if found is None:
            return ta, n_tokens
        last = found[0]
    return ta, last if enc.token_to_chars(last)[0] >= b else last + 1


PROBE_TEXT = ("Hello, world!  Two  spaces\tand a tab\nA new line; 12345 + 3.14 = x_y.\n\n"
              "  Indented: caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f642 end ")
PROBE_CHAT = [("system", "Be brief.  "), ("user", PROBE_TEXT),
              ("assistant", " Sure: " + PROBE_TEXT), ("user", "ok?"), ("assistant", "\nYes.")]


def _spans_agree(backend: Any, table: ByteTable, texts: list[str]) -> bool:
    """Whether token spans from byte lengths equal those from tracked offsets on `texts`, for
    every span start and end, with the same ids: a check of token_byte_lengths' reading of the
    tokenizer before it is trusted. A text whose tokens do not spell it is left out (at run
    time such a row takes the offset path), but the all-ASCII probe must pass."""
    for text in texts:
        enc = backend.encode(text, add_special_tokens=False)
        (fast,) = backend.encode_batch_fast([text], add_special_tokens=False)
        if fast.ids != enc.ids:
            return False
        ends = token_ends(table, enc.ids, text)
        if ends is None:
            if text.isascii():
                return False
            continue
        n_chars, n_tokens = len(text), len(enc.ids)
        for p in range(n_chars + 1):
            if span_tokens(ends, text, p, n_chars) != _span_tokens(enc, p, n_chars, n_chars,
                                                                    n_tokens) \
                    or span_tokens(ends, text, 0, p) != _span_tokens(enc, 0, p, n_chars,
                                                                      n_tokens):
                return False
    return True


class _Ids(NamedTuple):
    """Token ids from a tokenizer without offsets (in place of a fast tokenizer's Encoding)."""

    ids: list[int]


@dataclass
class _RenderedBatch:
    texts: list[str]
    spans: list[tuple[tuple[int, int, bool], ...]]
    origins: list[RowOrigin]


class ExampleEncoder:
    """Turns batches of (Example, origin) into TokenizedRows; bad rows raise or are counted.

    `encode` does one batch; `encode_batches` does many, tokenizing on worker threads (the fast
    tokenizer releases the GIL) while the calling thread reads and renders the next batch and
    assembles the previous one.
    """

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
        self._encoding_backend: Any = None
        self._token_bytes: ByteTable | None = None  # see token_bytes; None: track offsets
        self.train_all = renderer.train_on == "all"

    def warm_up(self) -> Any:
        """Make the tokenizer copy that encodes (see _without_template_processing), compile the
        chat template, and return the copy. Done on first use, since a cached run needs none;
        call it before threads or forked processes start, so that they share the work."""
        if self._encoding_backend is None and self.backend is not None:
            backend = _without_template_processing(self.backend)
            probes = [PROBE_TEXT, PROBE_TEXT.encode("ascii", "ignore").decode()]
            for chat in (PROBE_CHAT, PROBE_CHAT[1:3], [("user", "?"), ("assistant", ".")]):
                with suppress(BadRow):  # a template may refuse a conversation (a system turn)
                    probes.append(self.renderer.render(Example(messages=chat)).text)
                    break
            table = token_byte_lengths(backend)
            if table is not None and _spans_agree(backend, table, probes):
                self._token_bytes = table
            self._encoding_backend = backend
        return self._encoding_backend

    def encode(self, items: list[tuple[Example, RowOrigin]], counts: RowCounts) -> TokenizedRows:
        batch = self._render(items, counts)
        return self._assemble(batch, self._encode_texts(batch.texts), counts)

    def encode_batches(self, batches: Iterable[list[tuple[Example, RowOrigin]]],
                       counts: RowCounts, *, threads: bool = True) -> Iterator[TokenizedRows]:
        """`encode` over each batch, in order, with the garbage collector paused; with
        `threads`, tokenization is overlapped on worker threads (see the class)."""
        if self.backend is None or not threads:
            with gc_paused():
                yield from (self.encode(items, counts) for items in batches)
            return
        self.warm_up()
        with gc_paused(), single_threaded_tokenizer(), \
                ThreadPoolExecutor(tokenizer_threads()) as pool:
            pending: deque = deque()
            for items in batches:
                batch = self._render(items, counts)
                chunks = [batch.texts[i:i + TOKENIZE_CHUNK]
                          for i in range(0, len(batch.texts), TOKENIZE_CHUNK)]
                pending.append((batch, chunks, [pool.submit(self._encode_texts, c)
                                                for c in chunks]))
                if len(pending) > 1:
                    yield self._finish(*pending.popleft(), counts)
            while pending:
                yield self._finish(*pending.popleft(), counts)

    def _finish(self, batch: _RenderedBatch, chunks: list[list[str]], futures: list[Future],
                counts: RowCounts) -> TokenizedRows:
        """Assemble a batch once its chunks are tokenized. The calling thread tokenizes the
        chunks no worker has started yet (last first, while the workers go front to back), so
        it is never idle while the workers are still busy."""
        encoded: list[list] = [[] for _ in chunks]
        for k in reversed(range(len(chunks))):
            if futures[k].cancel():
                encoded[k] = self._encode_texts(chunks[k])
        for k, future in enumerate(futures):
            if not future.cancelled():
                encoded[k] = future.result()
        return self._assemble(batch, [e for part in encoded for e in part], counts)

    def _render(self, items: list[tuple[Example, RowOrigin]], counts: RowCounts) -> _RenderedBatch:
        texts, spans, origins = [], [], []
        render = self.renderer.render
        for example, origin in items:
            try:
                rendered = render(example)
            except BadRow as bad:
                reject(bad, origin, counts, self.on_bad_row)
                continue
            texts.append(rendered.text)
            spans.append(rendered.spans)
            origins.append(origin)
        return _RenderedBatch(texts, spans, origins)

    def _encode_texts(self, texts: list[str]) -> list[Any]:
        if self.backend is not None:
            backend = self.warm_up()
            if self._token_bytes is not None:
                return backend.encode_batch_fast(texts, add_special_tokens=False)
            return backend.encode_batch(texts, add_special_tokens=False)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [_Ids(list(i)) for i in ids]

    def _token_spans(self, text: str, ids: list[int], enc: Any, spans) -> list:
        n_chars, n_tokens = len(text), len(ids)
        if self._token_bytes is not None:
            ends = token_ends(self._token_bytes, ids, text)
            if ends is not None:
                return [(*span_tokens(ends, text, a, b), needs_eos) for a, b, needs_eos in spans]
            # Tokens that do not spell this row (a literal metaspace, an unknown token): the
            # same encoding again, with offsets.
            enc = self._encoding_backend.encode(text, add_special_tokens=False)
        if not isinstance(enc, _Ids):
            return [(*_span_tokens(enc, a, b, n_chars, n_tokens), needs_eos)
                    for a, b, needs_eos in spans]
        # A tokenizer without offsets: count the tokens of each prefix.
        def count(char: int) -> int:
            if char >= n_chars:
                return n_tokens
            return len(self.tokenizer(text[:char], add_special_tokens=False)["input_ids"])
        return [(count(a), count(b), needs_eos) for a, b, needs_eos in spans]

    def _assemble(self, batch: _RenderedBatch, encoded: list[Any],
                  counts: RowCounts) -> TokenizedRows:
        """Ids and trained flags of the batch's rows: BOS, EOS, truncation, the first token
        never trained. Done on whole arrays unless an EOS must be inserted somewhere."""
        if any(needs_eos for spans in batch.spans for _, _, needs_eos in spans):
            return self._assemble_rows(batch, encoded, counts)
        return self._assemble_arrays(batch, encoded, counts)

    def _assemble_arrays(self, batch: _RenderedBatch, encoded: list[Any],
                         counts: RowCounts) -> TokenizedRows:
        """`_assemble_rows` (the reference), for batches where no EOS is inserted, with numpy
        over the whole batch instead of Python per row."""
        ids = [enc.ids for enc in encoded]
        m = len(ids)
        if m == 0:
            return TokenizedRows.empty()
        sizes = np.fromiter(map(len, ids), np.int64, m)
        row_starts = np.zeros(m + 1, np.int64)
        np.cumsum(sizes, out=row_starts[1:])
        flat = np.fromiter(chain.from_iterable(ids), np.int64, int(row_starts[-1]))
        row, ta, tb = self._batch_spans(batch, ids, encoded, flat, row_starts)

        shift = np.zeros(m, np.int64)  # 1 where BOS goes in front
        if self.bos is not None:
            first = np.full(m, -1, np.int64)
            first[sizes > 0] = flat[row_starts[:-1][sizes > 0]]
            shift[first != self.bos] = 1
        n = sizes + shift
        keep = np.ones(m, bool)
        over = n > self.max_seq_len
        if over.any():
            k = int(np.flatnonzero(over)[0])
            if self.truncation == "error":
                raise DataError(f"{batch.origins[k]}: {n[k]} tokens, longer than "
                                f"data.max_seq_len={self.max_seq_len}; raise data.max_seq_len "
                                "or set data.truncation=truncate (cut) or drop (skip such rows)")
            if self.truncation == "drop":
                keep &= ~over
                counts.dropped += int(over.sum())
            else:
                n = np.minimum(n, self.max_seq_len)
                counts.truncated += int(over.sum())
        if self.train_all:
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

        kept = np.flatnonzero(keep)
        out_starts = np.zeros(m, np.int64)  # each kept row's first token in the output
        offsets = np.zeros(len(kept) + 1, np.int64)
        np.cumsum(n[kept], out=offsets[1:])
        out_starts[kept] = offsets[:-1]
        source = (np.arange(offsets[-1], dtype=np.int64)
                  + np.repeat(row_starts[kept] - offsets[:-1] - shift[kept], n[kept]))
        tokens = flat.take(source, mode="clip").astype(np.int32)  # BOS places: set next
        if self.bos is not None:
            tokens[offsets[:-1][shift[kept] == 1]] = self.bos
        marks = np.zeros(len(tokens) + 1, np.int32)
        np.add.at(marks, out_starts[row[live]] + a[live], 1)
        np.add.at(marks, out_starts[row[live]] + b[live], -1)
        return TokenizedRows(tokens, np.cumsum(marks[:-1]) > 0, offsets)

    def _batch_spans(self, batch: _RenderedBatch, ids: list[list[int]], encoded: list[Any],
                     flat: np.ndarray, row_starts: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every span's row and token range [ta, tb), in row order: from token byte lengths
        where the tokens spell their row, else from offsets (`_token_spans`)."""
        if self._token_bytes is not None:
            row, ta, tb, spelled = batch_span_tokens(self._token_bytes, flat, row_starts,
                                                     batch.texts, batch.spans)
            for k in np.flatnonzero(~spelled):
                spans = self._token_spans(batch.texts[k], ids[k], encoded[k], batch.spans[k])
                at = np.flatnonzero(row == k)
                ta[at] = [ta_k for ta_k, _, _ in spans]
                tb[at] = [tb_k for _, tb_k, _ in spans]
            return row, ta, tb
        row, ta, tb = [], [], []
        for k, (text, spans, enc) in enumerate(zip(batch.texts, batch.spans, encoded,
                                                   strict=True)):
            for ta_k, tb_k, _ in self._token_spans(text, ids[k], enc, spans):
                row.append(k)
                ta.append(ta_k)
                tb.append(tb_k)
        return (np.array(row, np.int64), np.array(ta, np.int64), np.array(tb, np.int64))

    def _assemble_rows(self, batch: _RenderedBatch, encoded: list[Any],
                       counts: RowCounts) -> TokenizedRows:
        flat: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        offsets = [0]
        bos, max_len = self.bos, self.max_seq_len
        for text, spans, origin, enc in zip(batch.texts, batch.spans, batch.origins, encoded,
                                            strict=True):
            ids = enc.ids
            spans = self._token_spans(text, ids, enc, spans)
            shift = 0
            if bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
                shift = 1
            if any(needs_eos for _, _, needs_eos in spans):
                spans = [(a + shift, b + shift, e) for a, b, e in spans]
                ids, spans = self._insert_eos(ids, spans, origin)
                shift = 0
            n = len(ids)
            if n > max_len:
                if self.truncation == "error":
                    raise DataError(f"{origin}: {n} tokens, longer than data.max_seq_len="
                                    f"{max_len}; raise data.max_seq_len or set "
                                    "data.truncation=truncate (cut) or drop (skip such rows)")
                if self.truncation == "drop":
                    counts.dropped += 1
                    continue
                n = max_len
                del ids[n:]
                counts.truncated += 1
            base, kept = len(flat), len(starts)
            for a, b, _ in ((0, n - shift, False),) if self.train_all else spans:
                a, b = max(a + shift, 1), min(b + shift, n)  # the first token is never a target
                if b > a:
                    starts.append(base + a)
                    ends.append(base + b)
            if len(starts) == kept:
                counts.dropped += 1
                logger.debug("%s: no trained tokens left after truncation; dropped", origin)
                continue
            flat.extend(ids)
            offsets.append(len(flat))
        return _pack_rows(flat, starts, ends, offsets)

    def _insert_eos(self, ids: list[int], spans, origin: RowOrigin):
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


def usable_cpus() -> int:
    """CPUs this process may use, shared with the other ranks on this machine (torchrun sets
    LOCAL_WORLD_SIZE)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, ranks))


def tokenizer_threads() -> int:
    """Worker threads that tokenize: one per usable CPU, less the calling thread (which reads,
    renders, assembles, and tokenizes whatever the workers have not started)."""
    return max(1, usable_cpus() - 1)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. Tokenizing creates millions of short-lived lists
    and no reference cycles (reference counting frees them all), and with the collector on, its
    passes over every live object cost about as much as the reading and rendering themselves."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def single_threaded_tokenizer() -> Iterator[None]:
    """Turn off the fast tokenizer's own thread pool while our threads tokenize (its pool would
    compete with them for the same cores), unless the user set TOKENIZERS_PARALLELISM."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _pack_rows(flat: list[int], starts: list[int], ends: list[int],
               offsets: list[int]) -> TokenizedRows:
    tokens = np.array(flat, dtype=np.int32)
    marks = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.add.at(marks, np.array(starts, dtype=np.int64), 1)
    np.add.at(marks, np.array(ends, dtype=np.int64), -1)
    trained = np.cumsum(marks[:-1]) > 0
    return TokenizedRows(tokens, trained, np.array(offsets, dtype=np.int64))
