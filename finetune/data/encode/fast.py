"""The fast encode path: a drop-in for OffsetEncoder that gives the same rows, faster.

- Chat templates that only print contents render each role sequence once (layout).
- Token spans come from token byte lengths instead of offset tracking (~45% of the tokenizer's
  time) for tokenizers whose tokens spell the text (token_bytes); a row whose tokens do not
  spell it is encoded again with offsets.
- The tokenizer encodes through a copy without its TemplateProcessing post-processor, which
  changes nothing when no special tokens are asked for and costs 5-10% of its time.
- Worker threads tokenize while the calling thread reads, renders and assembles, with the
  garbage collector paused (cpus); a large line-based source is tokenized in forked processes
  (shards).
- A source whose key is in the tokenized-data cache is read from it, not tokenized (cache).
Tests hold every one of these equal to OffsetEncoder.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any

import numpy as np

from finetune.config.data import DataConfig
from finetune.data.encode.assembly import TokenBatch, eos_flags, flatten
from finetune.data.encode.cache import TokenCache
from finetune.data.encode.cpus import gc_paused, single_threaded_tokenizer, tokenizer_threads
from finetune.data.encode.layout import LayoutRenderer
from finetune.data.encode.offsets import OffsetEncoder, RenderedBatch, span_tokens_from_offsets
from finetune.data.encode.shards import plan_shards, tokenize_in_shards
from finetune.data.encode.token_bytes import (
    ByteTable,
    batch_span_tokens,
    span_tokens,
    token_byte_lengths,
    token_ends,
)
from finetune.data.errors import BadRow, RowOrigin
from finetune.data.formats import Example, RowConverter
from finetune.data.ingest import SourceTokens, batches_of, examples_from, source_converter
from finetune.data.sources import Source, SourceRow
from finetune.data.tokenized import RowCounts, TokenizedRows

logger = logging.getLogger(__name__)

TOKENIZE_CHUNK = 128  # rows per tokenizer call: small enough to share a batch between threads
PROBE_TEXT = ("Hello, world!  Two  spaces\tand a tab\nA new line; 12345 + 3.14 = x_y.\n\n"
              "  Indented: caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f642 end ")
PROBE_CHAT = [("system", "Be brief.  "), ("user", PROBE_TEXT),
              ("assistant", " Sure: " + PROBE_TEXT), ("user", "ok?"), ("assistant", "\nYes.")]


def without_template_processing(backend: Any) -> Any:
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
            if span_tokens(ends, text, p, n_chars) != span_tokens_from_offsets(
                    enc, p, n_chars, n_chars, n_tokens) \
                    or span_tokens(ends, text, 0, p) != span_tokens_from_offsets(
                        enc, 0, p, n_chars, n_tokens):
                return False
    return True


class FastEncoder(OffsetEncoder):
    """OffsetEncoder's contract and rows, made faster (see the module). `cache`: where whole
    sources' tokens are kept (None: no cache)."""

    renderer_type = LayoutRenderer

    def __init__(self, tokenizer: Any, template: str, *, train_on: str = "assistant",
                 max_seq_len: int, truncation: str = "truncate", on_bad_row: str = "error",
                 cache: TokenCache | None = None) -> None:
        super().__init__(tokenizer, template, train_on=train_on, max_seq_len=max_seq_len,
                         truncation=truncation, on_bad_row=on_bad_row)
        self.cache = cache
        self._encoding_backend: Any = None
        self._token_bytes: ByteTable | None = None  # None: track offsets

    def warm_up(self) -> Any:
        """Make the tokenizer copy that encodes (see without_template_processing), compile the
        chat template, decide whether byte lengths can stand in for offsets, and return the
        copy. Done on first use, since a cached run needs none; call it before threads or forked
        processes start, so that they share the work."""
        if self._encoding_backend is None and self.backend is not None:
            backend = without_template_processing(self.backend)
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

    def encode_batches(self, batches: Iterable[list[tuple[Example, RowOrigin]]],
                       counts: RowCounts, *, threads: bool = True) -> Iterator[TokenizedRows]:
        """`encode` over each batch, in order, with the garbage collector paused. With
        `threads`, worker threads tokenize while this thread reads and renders the next batch
        and assembles the previous one."""
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
                pending.append((batch, chunks, [pool.submit(self._tokenize, c) for c in chunks]))
                if len(pending) > 1:
                    yield self._finish(*pending.popleft(), counts)
            while pending:
                yield self._finish(*pending.popleft(), counts)

    def encode_source(self, source: Source, cfg: DataConfig, key: str) -> SourceTokens:
        """OffsetEncoder.encode_source, read from the cache under `key` when it is there (and
        stored there when not), in several processes when the source is large (data.num_proc)."""
        if self.cache is not None:
            hit = self.cache.load(key)
            if hit is not None:
                rows, meta = hit
                logger.info("%s: %d examples from the tokenized-data cache", source.spec, len(rows))
                return SourceTokens(source, meta["format"], rows,
                                    RowCounts.from_dict(meta["counts"]), key, from_cache=True)
        started = time.perf_counter()
        name, converter = source_converter(source, cfg)
        encode_rows = partial(self._encode_rows, converter=converter)
        plan = plan_shards(source, cfg.num_proc)
        with gc_paused():  # from the start: a collection over a large heap can take 0.1 s
            if plan is not None:
                self.warm_up()
                rows, counts = tokenize_in_shards(source, plan, encode_rows)
            else:
                rows, counts = encode_rows(source.rows(), threads=True)
        logger.info("%s: tokenized %d rows into %d examples in %.1fs (%s format)", source.spec,
                    counts.read, len(rows), time.perf_counter() - started, name)
        if self.cache is not None:
            self.cache.store(key, rows, {"format": name, "counts": counts.to_dict(),
                                         "spec": source.spec})
        return SourceTokens(source, name, rows, counts, key, from_cache=False)

    def _encode_rows(self, rows: Iterator[SourceRow], converter: RowConverter, *,
                     threads: bool = True) -> tuple[TokenizedRows, RowCounts]:
        counts = RowCounts()
        batches = batches_of(examples_from(rows, converter, counts, self.on_bad_row))
        parts = list(self.encode_batches(batches, counts, threads=threads))
        return TokenizedRows.concat(parts), counts

    def _finish(self, batch: RenderedBatch, chunks: list[list[str]], futures: list[Future],
                counts: RowCounts) -> TokenizedRows:
        """Assemble a batch once its chunks are tokenized. The calling thread tokenizes the
        chunks no worker has started yet (last first, while the workers go front to back), so
        it is never idle while the workers are still busy."""
        encoded: list[list] = [[] for _ in chunks]
        for k in reversed(range(len(chunks))):
            if futures[k].cancel():
                encoded[k] = self._tokenize(chunks[k])
        for k, future in enumerate(futures):
            if not future.cancelled():
                encoded[k] = future.result()
        return self._assemble(batch, [e for part in encoded for e in part], counts)

    def _tokenize(self, texts: list[str]) -> list[Any]:
        if self.backend is None:
            return super()._tokenize(texts)
        backend = self.warm_up()
        if self._token_bytes is not None:
            return backend.encode_batch_fast(texts, add_special_tokens=False)
        return backend.encode_batch(texts, add_special_tokens=False)

    def _token_batch(self, batch: RenderedBatch, encoded: list[Any]) -> TokenBatch:
        """Spans from byte lengths where the tokens spell their row, else from offsets."""
        if self._token_bytes is None:
            return super()._token_batch(batch, encoded)
        flat, row_starts = flatten([enc.ids for enc in encoded])
        row, ta, tb, spelled = batch_span_tokens(self._token_bytes, flat, row_starts,
                                                 batch.texts, batch.spans)
        for k in np.flatnonzero(~spelled):
            # Tokens that do not spell this row (a literal metaspace, an unknown token): the
            # same encoding again, with offsets.
            text = batch.texts[k]
            enc = self._encoding_backend.encode(text, add_special_tokens=False)
            spans = self._row_spans(text, enc, batch.spans[k])
            at = np.flatnonzero(row == k)
            ta[at] = [ta_k for ta_k, _ in spans]
            tb[at] = [tb_k for _, tb_k in spans]
        return TokenBatch(flat, row_starts, row, ta, tb, eos_flags(batch.spans), batch.origins)
