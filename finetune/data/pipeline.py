"""build_data: sources -> formats -> template + mask -> (pack) -> collate, for one rank.

The trainer calls `build_data(cfg.data, tokenizer, attention=plan's attention, seed=...,
micro_batch_size=..., rank=..., world_size=...)` and gets a DataBundle: `train` (resumable
micro-batches), `val_batches(max_batches)` and `stats`.

Held-out rows: `data.val_path` if set, else `data.val_split` of each source, chosen with a fixed
seed so every training seed sees the same split. Mixtures: with several paths and
`data.weights`, source i gets round(w_i / sum(w) * total rows) examples per epoch (repeated if
that is more than it has, a seeded subset if fewer), fixed for the run.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from finetune.config.data import DataConfig
from finetune.data.cache import TokenCache, default_cache_dir, tokenizer_fingerprint
from finetune.data.collate import Collator, Document
from finetune.data.errors import DataError
from finetune.data.formats import FORMATS
from finetune.data.ingest import SourceTokens, tokenize_source
from finetune.data.packing import pack_documents, packing_efficiency, packing_isolation
from finetune.data.readers import TEXT_UNITS
from finetune.data.sampler import TrainBatches
from finetune.data.sources import path_list, resolve_source
from finetune.data.template import ChatRenderer, resolve_template
from finetune.data.tokenized import ExampleEncoder, RowCounts, TokenizedRows

logger = logging.getLogger(__name__)

SPLIT_SEED = 20240917  # the held-out split does not move with the training seed


@dataclass
class DataStats:
    """What the data pipeline produced; `to_dict()` goes into summary.json."""

    format: str
    rows: int | None  # training examples per epoch (None: streaming, not known up front)
    val_rows: int | None
    tokens: int | None  # tokens in one epoch of training examples
    trained_tokens: int | None  # tokens with a label (targets), same epoch
    skipped_rows: int
    truncated_rows: int
    dropped_rows: int
    packed_sequences: int | None
    packing_efficiency: float | None
    max_seq_len: int
    streaming: bool = False
    isolation: str | None = None
    template: str = "tokenizer"
    rows_read: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataBundle:
    """What the trainer gets: training batches, held-out batches, statistics."""

    train: Any  # TrainBatches, or StreamingTrainBatches when data.streaming
    _stats: Callable[[], DataStats]
    _val: Callable[[int | None], list[dict]]
    _preview: Callable[[int], list[Document]]

    @property
    def stats(self) -> DataStats:
        """Statistics; when streaming, the row counts so far (rows/tokens are None)."""
        return self._stats()

    def val_batches(self, max_batches: int | None = None) -> list[dict]:
        """The held-out split for this rank, collated, in a fixed order."""
        return self._val(max_batches)

    def preview(self, n: int = 1) -> list[Document]:
        """The first n training examples (file order) as (token ids, trained flags)."""
        return self._preview(n)


def check_settings(cfg: DataConfig) -> None:
    """Settings errors before any data is read."""
    if not 0.0 <= float(cfg.val_split) < 1.0:
        raise DataError(f"data.val_split={cfg.val_split} must be in [0, 1)")
    if cfg.stream_buffer < 1:
        raise DataError(f"data.stream_buffer={cfg.stream_buffer} must be at least 1")
    if cfg.format != "auto" and cfg.format not in FORMATS:
        raise DataError(f"unknown data.format={cfg.format!r}; choose one of auto, "
                        f"{', '.join(FORMATS)}")
    if cfg.num_proc < 0:
        raise DataError(f"data.num_proc={cfg.num_proc} must be 0 (one process per CPU) or more")
    if cfg.text_unit not in TEXT_UNITS:
        raise DataError(f"data.text_unit={cfg.text_unit!r} is not one of {', '.join(TEXT_UNITS)}")


def mixture_weights(weights: Any, n_sources: int) -> list[float] | None:
    if weights is None:
        return None
    values = [weights] if isinstance(weights, (int, float)) else list(weights)
    if len(values) != n_sources:
        raise DataError(f"data.weights has {len(values)} values for {n_sources} data.path "
                        "entries; give one weight per path")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"data.weights must be numbers, got {weights!r}") from None
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"data.weights must be non-negative with a positive sum, got {values}")
    return values


def _split(n: int, val_split: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = min(int(round(n * val_split)), max(n - 1, 0))
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _mixture(train_parts: list[TokenizedRows], weights: list[float] | None,
             seed: int) -> list[TokenizedRows]:
    if weights is None:
        return train_parts
    total = sum(len(p) for p in train_parts)
    out = []
    for i, (part, w) in enumerate(zip(train_parts, weights, strict=True)):
        quota = int(round(w / sum(weights) * total))
        n = len(part)
        if quota and not n:
            raise DataError(f"data.path[{i}] has no usable rows but data.weights[{i}]={w}")
        if not quota:
            continue
        rng = np.random.default_rng((seed, 7919, i))
        picks = np.concatenate([np.tile(np.arange(n), quota // n),
                                np.sort(rng.choice(n, quota % n, replace=False))])
        out.append(part.select(picks))
    return out


def _units(rows: TokenizedRows, packing: bool, max_seq_len: int) -> list[list[int]] | None:
    return pack_documents(rows.lengths, max_seq_len) if packing else None


def _empty_error(loaded: list[SourceTokens], cfg: DataConfig) -> DataError:
    counts = RowCounts()
    for s in loaded:
        counts.merge(s.counts)
    reasons = ", ".join(f"{k}: {v}" for k, v in counts.skipped.items()) or "none"
    where = ", ".join(s.source.spec for s in loaded)
    return DataError(f"no usable training rows in {where}: {counts.read} read, "
                     f"{sum(counts.skipped.values())} skipped ({reasons}), {counts.dropped} dropped "
                     f"(data.truncation={cfg.truncation}, data.max_seq_len={cfg.max_seq_len}). "
                     + (f"First problem: {counts.first_skips[0]}" if counts.first_skips else ""))


def build_data(cfg: DataConfig, tokenizer: Any, *, attention: str, seed: int,
               micro_batch_size: int, rank: int = 0, world_size: int = 1,
               mask_dtype: torch.dtype = torch.float32) -> DataBundle:
    """Build the data for one rank. `attention` is the resolved attention implementation (it
    decides how packed documents are isolated); `mask_dtype` is the dtype of a 4D packed mask
    (the model's compute dtype). Raises DataError for bad data or settings."""
    check_settings(cfg)
    isolation = packing_isolation(attention) if cfg.packing else None
    template, template_from = resolve_template(tokenizer, cfg.chat_template)
    renderer = ChatRenderer(tokenizer, template, train_on=cfg.train_on)
    encoder = ExampleEncoder(tokenizer, renderer, max_seq_len=cfg.max_seq_len,
                             truncation=cfg.truncation, on_bad_row=cfg.on_bad_row)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    collator = Collator(pad_id=pad_id, isolation=isolation, mask_dtype=mask_dtype)
    options = {"split": cfg.split, "json_key": cfg.json_key, "text_unit": cfg.text_unit}
    sources = [resolve_source(spec, **options) for spec in path_list(cfg.path)]
    weights = mixture_weights(cfg.weights, len(sources))
    val_sources = ([resolve_source(spec, **options) for spec in path_list(cfg.val_path,
                                                                         "data.val_path")]
                   if cfg.val_path is not None else [])
    tok_hash = tokenizer_fingerprint(tokenizer, template)
    if cfg.streaming:
        from finetune.data.streaming import build_streaming

        return build_streaming(cfg, sources, weights, val_sources, encoder, collator,
                               seed=seed, micro_batch_size=micro_batch_size, rank=rank,
                               world_size=world_size, template_from=template_from,
                               isolation=isolation)
    cache = TokenCache(default_cache_dir(cfg.cache_dir))
    loaded = [tokenize_source(s, cfg, encoder, cache, tok_hash) for s in sources]
    val_loaded = [tokenize_source(s, cfg, encoder, cache, tok_hash) for s in val_sources]
    if val_sources:
        train_parts = [s.rows for s in loaded]
        val_rows = TokenizedRows.concat([s.rows for s in val_loaded])
    else:
        splits = [_split(len(s.rows), float(cfg.val_split)) for s in loaded]
        train_parts = [s.rows.select(t) for s, (t, _) in zip(loaded, splits, strict=True)]
        val_rows = TokenizedRows.concat([s.rows.select(v)
                                         for s, (_, v) in zip(loaded, splits, strict=True)])
    train_rows = TokenizedRows.concat(_mixture(train_parts, weights, seed))
    if not len(train_rows):
        raise _empty_error(loaded, cfg)
    units = _units(train_rows, cfg.packing, cfg.max_seq_len)
    val_units = _units(val_rows, cfg.packing, cfg.max_seq_len)
    fingerprint = hashlib.sha256(repr(([s.key for s in loaded], [s.key for s in val_loaded],
                                       weights, cfg.val_split, cfg.packing)).encode()).hexdigest()
    train = TrainBatches(train_rows, units, collator, seed=seed, shuffle=cfg.shuffle,
                         micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                         fingerprint=fingerprint[:16])
    stats = _stats(cfg, loaded + val_loaded, train_rows, units, len(val_rows), isolation,
                   template_from)
    logger.info("data: %s", _summary(stats))

    def val(max_batches: int | None) -> list[dict]:
        return held_out_batches(val_rows, val_units, collator, micro_batch_size=micro_batch_size,
                                rank=rank, world_size=world_size, max_batches=max_batches)

    def preview(n: int) -> list[Document]:
        return [train_rows.example(i) for i in range(min(n, len(train_rows)))]

    return DataBundle(train, lambda: stats, val, preview)


def held_out_batches(rows: TokenizedRows, units: list[list[int]] | None, collator: Collator, *,
                     micro_batch_size: int, rank: int, world_size: int,
                     max_batches: int | None) -> list[dict]:
    """Held-out batches for one rank: every rank gets the same number of batches; where the
    rows run out, a rank gets one copy of the first unit with every label masked (no tokens)."""
    if units is None:
        units = [[i] for i in range(len(rows))]
    if not units:
        return []
    step = world_size * micro_batch_size
    n_batches = -(-len(units) // step)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    batches = []
    for g in range(n_batches):
        start = g * step + rank * micro_batch_size
        mine = units[start:start + micro_batch_size]
        if mine:
            docs = [[rows.example(d) for d in unit] for unit in mine]
        else:
            docs = [[(ids, np.zeros_like(trained)) for ids, trained in
                     (rows.example(d) for d in units[0])]]
        batches.append(collator(docs))
    return batches


def _stats(cfg: DataConfig, loaded: list[SourceTokens], train_rows: TokenizedRows,
           units: list[list[int]] | None, val_rows: int, isolation: str | None,
           template_from: str) -> DataStats:
    counts = RowCounts()
    for s in loaded:
        counts.merge(s.counts)
    tokens = int(train_rows.offsets[-1])
    formats = list(dict.fromkeys(s.format for s in loaded))
    return DataStats(
        format="+".join(formats), rows=len(train_rows), val_rows=val_rows, tokens=tokens,
        trained_tokens=int(np.count_nonzero(train_rows.trained)),
        skipped_rows=sum(counts.skipped.values()), truncated_rows=counts.truncated,
        dropped_rows=counts.dropped, packed_sequences=len(units) if units is not None else None,
        packing_efficiency=(round(packing_efficiency(tokens, len(units), cfg.max_seq_len), 4)
                            if units is not None else None),
        max_seq_len=cfg.max_seq_len, isolation=isolation, template=template_from,
        rows_read=counts.read, skip_reasons=dict(counts.skipped),
        sources=[{"path": s.source.spec, "format": s.format, "examples": len(s.rows),
                  "read": s.counts.read, "skipped": sum(s.counts.skipped.values()),
                  "from_cache": s.from_cache} for s in loaded])


def _summary(stats: DataStats) -> str:
    text = (f"{stats.format}, {stats.rows} training examples ({stats.tokens} tokens, "
            f"{stats.trained_tokens} trained), {stats.val_rows} held out; skipped "
            f"{stats.skipped_rows}, truncated {stats.truncated_rows}, dropped {stats.dropped_rows}")
    if stats.packed_sequences is not None:
        text += (f"; packed into {stats.packed_sequences} rows of {stats.max_seq_len} "
                 f"({stats.packing_efficiency:.1%} full, isolation: {stats.isolation})")
    return text
