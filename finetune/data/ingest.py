"""One source from rows to tokens: format detection, conversion, batched tokenization, cache.

`tokenize_source` returns the source's TokenizedRows and what happened to its rows; a second
call with the same data, tokenizer and settings reads them from the cache without calling the
tokenizer. `examples_from` is the lazy row -> Example step shared with streaming.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.cache import TokenCache, cache_key
from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import Example, RowConverter, converter_for, detect_format
from finetune.data.shards import plan_shards, tokenize_in_shards
from finetune.data.sources import Source, SourcePosition, SourceRow
from finetune.data.tokenized import ExampleEncoder, RowCounts, TokenizedRows, gc_paused, reject

logger = logging.getLogger(__name__)

DETECT_ROWS = 20
ENCODE_BATCH = 1024


@dataclass
class SourceTokens:
    """A source's tokenized examples (file order) and what happened to its rows."""

    source: Source
    format: str
    rows: TokenizedRows
    counts: RowCounts
    key: str
    from_cache: bool


def source_converter(source: Source, cfg: DataConfig) -> tuple[str, RowConverter]:
    """The source's format (detected from its first rows when data.format=auto)."""
    columns = dict(cfg.columns or {})
    name = cfg.format
    if name == "auto":
        rows = [row for row, _, _ in itertools.islice(source.rows(), DETECT_ROWS * 5)
                if isinstance(row, dict)][:DETECT_ROWS]
        if not rows:
            raise DataError(f"{source.spec}: no readable rows to detect the format from; check "
                            "the file, or set data.format=NAME")
        name = detect_format(rows, columns, source.spec)
    return name, converter_for(name, columns)


def examples_from(rows: Iterator[SourceRow], converter: RowConverter, counts: RowCounts,
                  on_bad_row: str) -> Iterator[tuple[Example, RowOrigin, SourcePosition]]:
    """Rows to Examples; bad rows raise a located DataError or are counted as skipped."""
    for row, origin, position in rows:
        counts.read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            example = converter(row)
        except BadRow as bad:
            reject(bad, origin, counts, on_bad_row)
            continue
        yield example, origin, position


def batches_of(examples: Iterator[tuple[Example, RowOrigin, SourcePosition]]
               ) -> Iterator[list[tuple[Example, RowOrigin]]]:
    """Lists of ENCODE_BATCH (example, origin) pairs."""
    while True:
        batch = [(example, origin) for example, origin, _ in
                 itertools.islice(examples, ENCODE_BATCH)]
        if not batch:
            return
        yield batch


def tokenize_rows(rows: Iterator[SourceRow], *, converter: RowConverter, encoder: ExampleEncoder,
                  on_bad_row: str, threads: bool) -> tuple[TokenizedRows, RowCounts]:
    """Rows -> examples -> tokens in this process; with `threads`, tokenizing overlaps the
    Python work on worker threads (ExampleEncoder.encode_batches)."""
    counts = RowCounts()
    batches = batches_of(examples_from(rows, converter, counts, on_bad_row))
    parts = list(encoder.encode_batches(batches, counts, threads=threads))
    return TokenizedRows.concat(parts), counts


def settings_material(cfg: DataConfig, tokenizer_hash: str) -> dict[str, Any]:
    """Every setting that changes the tokens of a source (the cache key, minus the source;
    not data.num_proc, which changes only how fast they are made)."""
    return {"tokenizer": tokenizer_hash, "format": cfg.format,
            "columns": sorted(dict(cfg.columns or {}).items()), "max_seq_len": cfg.max_seq_len,
            "truncation": cfg.truncation, "train_on": cfg.train_on, "on_bad_row": cfg.on_bad_row}


def tokenize_source(source: Source, cfg: DataConfig, encoder: ExampleEncoder,
                    cache: TokenCache | None, tokenizer_hash: str) -> SourceTokens:
    """Tokenize every row of `source`, or read the result from the cache."""
    key = cache_key({"source": source.fingerprint(), **settings_material(cfg, tokenizer_hash)})
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            rows, meta = hit
            logger.info("%s: %d examples from the tokenized-data cache", source.spec, len(rows))
            return SourceTokens(source, meta["format"], rows, RowCounts.from_dict(meta["counts"]),
                                key, True)
    started = time.perf_counter()
    name, converter = source_converter(source, cfg)
    tokenize = partial(tokenize_rows, converter=converter, encoder=encoder,
                       on_bad_row=cfg.on_bad_row)
    plan = plan_shards(source, cfg.num_proc)
    with gc_paused():  # from the start: a collection over a large heap can take 0.1 s
        if plan is not None:
            encoder.warm_up()
            rows, counts = tokenize_in_shards(source, plan, tokenize)
        else:
            rows, counts = tokenize(source.rows(), threads=True)
    logger.info("%s: tokenized %d rows into %d examples in %.1fs (%s format)", source.spec,
                counts.read, len(rows), time.perf_counter() - started, name)
    if cache is not None:
        cache.store(key, rows, {"format": name, "counts": counts.to_dict(), "spec": source.spec})
    return SourceTokens(source, name, rows, counts, key, False)
