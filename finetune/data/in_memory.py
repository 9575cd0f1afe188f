"""TrainData held in memory: every source tokenized up front (or read from the cache).

Held-out rows: `data.val_path` if set, else `data.val_split` of each source, chosen with a fixed
seed so every training seed sees the same split. Mixtures: with several paths and
`data.weights`, source i gets round(w_i / sum(w) * total rows) examples per epoch (repeated if
that is more than it has, a seeded subset if fewer), fixed for the run. Then packing (when on),
and the seeded, rank-sharded, resumable order of `TrainBatches`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np

from finetune.config.data import DataConfig
from finetune.data.collate import Collator, Document
from finetune.data.encode import Encoder
from finetune.data.errors import DataError
from finetune.data.held_out import held_out_batches
from finetune.data.ingest import SourceTokens, source_key
from finetune.data.length import choose_max_seq_len, context_hint, cut_rows, warn_if_many_cut
from finetune.data.packing import pack_documents, packing_efficiency
from finetune.data.sampler import TrainBatches
from finetune.data.sources import Source
from finetune.data.tokenized import RowCounts, TokenizedRows
from finetune.data.train_data import DataStats

logger = logging.getLogger(__name__)

SPLIT_SEED = 20240917  # the held-out split does not move with the training seed


class InMemoryData:
    """TrainData (finetune.data.train_data) over tokenized rows held in memory."""

    chat_template: str = ""  # set by build_data

    def __init__(self, train: TrainBatches, stats: DataStats, val_rows: TokenizedRows,
                 val_units: list[list[int]] | None, *, micro_batch_size: int, rank: int,
                 world_size: int) -> None:
        self.train = train
        self._stats = stats
        self._val_rows, self._val_units = val_rows, val_units
        self._micro_batch_size, self._rank, self._world_size = micro_batch_size, rank, world_size

    @property
    def stats(self) -> DataStats:
        return self._stats

    def val_batches(self, max_batches: int | None = None) -> list[dict]:
        return held_out_batches(self._val_rows, self._val_units, self.train.collator,
                                micro_batch_size=self._micro_batch_size, rank=self._rank,
                                world_size=self._world_size, max_batches=max_batches)

    def preview(self, n: int = 1) -> list[Document]:
        rows = self.train.rows
        return [rows.example(i) for i in range(min(n, len(rows)))]


def build_in_memory(cfg: DataConfig, sources: list[Source], weights: list[float] | None,
                    val_sources: list[Source], encoder: Encoder, collator: Collator, *,
                    tokenizer_hash: str, seed: int, micro_batch_size: int, rank: int,
                    world_size: int, isolation: str | None, template_from: str,
                    auto_cap: int | None = None, context: int | None = None,
                    evaluating: bool = False) -> InMemoryData:
    """Tokenize (or load) every source, split, mix, pack and order it (see the module).
    `tokenizer_hash` is ingest.tokenizer_fingerprint of the tokenizer and template in use.
    With `auto_cap` (data.max_seq_len=auto), the rows were encoded with that limit (the model's
    context) and are cut here to the chosen length (finetune.data.length). `context` is the
    model's context length, if known (what a truncation hint may advise). `evaluating`: only
    the held-out rows will be used (`finetune eval`), so the log line and the truncation
    warning speak of those alone.
    Raises DataError when no training row is left."""
    def encode(source: Source) -> SourceTokens:
        return encoder.encode_source(source, cfg, source_key(source, cfg, tokenizer_hash))

    loaded = [encode(s) for s in sources]
    val_loaded = [encode(s) for s in val_sources]
    length_from = "data.max_seq_len"
    if auto_cap is not None:
        lengths = np.concatenate([s.rows.lengths for s in loaded])
        choice = choose_max_seq_len(lengths, auto_cap, cfg.truncation)
        for s in loaded + val_loaded:
            s.rows = cut_rows(s.rows, choice.length, cfg.truncation, s.counts)
        cfg, length_from = replace(cfg, max_seq_len=choice.length), choice.source
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
        raise _empty_error(loaded, cfg, context)
    units = _units(train_rows, cfg.packing, cfg.max_seq_len)
    val_units = _units(val_rows, cfg.packing, cfg.max_seq_len)
    fingerprint = hashlib.sha256(repr(([s.key for s in loaded], [s.key for s in val_loaded],
                                       weights, cfg.val_split, cfg.packing)).encode()).hexdigest()
    train = TrainBatches(train_rows, units, collator, seed=seed, shuffle=cfg.shuffle,
                         micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                         fingerprint=fingerprint[:16])
    stats = _stats(cfg, loaded + val_loaded, train_rows, units, len(val_rows), isolation,
                   template_from, length_from)
    # Evaluating a held-out file: its own counts; held-out rows split off data.path: the
    # counts of the files they come from.
    counted = (val_loaded or loaded) if evaluating else loaded + val_loaded
    totals = RowCounts()
    for s in counted:
        totals.merge(s.counts)
    logger.info("data: %s", _evaluated(stats, val_rows, totals, bool(val_loaded))
                if evaluating else _summary(stats))
    warn_if_many_cut(totals, cfg.max_seq_len, length_from, context=context)
    return InMemoryData(train, stats, val_rows, val_units, micro_batch_size=micro_batch_size,
                        rank=rank, world_size=world_size)


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


def _empty_error(loaded: list[SourceTokens], cfg: DataConfig, context: int | None) -> DataError:
    counts = RowCounts()
    for s in loaded:
        counts.merge(s.counts)
    reasons = ", ".join(f"{k}: {v}" for k, v in counts.skipped.items()) or "none"
    where = ", ".join(s.source.spec for s in loaded)
    return DataError(f"no usable training rows in {where}: {counts.read} read, "
                     f"{sum(counts.skipped.values())} skipped ({reasons}), {counts.dropped} dropped "
                     f"(data.truncation={cfg.truncation}, data.max_seq_len={cfg.max_seq_len})."
                     + context_hint(counts, cfg.max_seq_len, context)
                     + (f" First problem: {counts.first_skips[0]}" if counts.first_skips else ""))


def _stats(cfg: DataConfig, loaded: list[SourceTokens], train_rows: TokenizedRows,
           units: list[list[int]] | None, val_rows: int, isolation: str | None,
           template_from: str, length_from: str) -> DataStats:
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
        max_seq_len=cfg.max_seq_len, max_seq_len_from=length_from, isolation=isolation,
        template=template_from,
        rows_read=counts.read, skip_reasons=dict(counts.skipped),
        sources=[{"path": s.source.spec, "format": s.format, "examples": len(s.rows),
                  "read": s.counts.read, "skipped": sum(s.counts.skipped.values()),
                  "from_cache": s.from_cache} for s in loaded])


def _evaluated(stats: DataStats, val_rows: TokenizedRows, counts: RowCounts,
               own_file: bool) -> str:
    where = "" if own_file else " (counts of the whole files they are held out from)"
    return (f"{stats.format}, {len(val_rows)} examples to evaluate ({int(val_rows.offsets[-1])} "
            f"tokens, {int(np.count_nonzero(val_rows.trained))} trained); of {counts.read} rows "
            f"read{where}: skipped {sum(counts.skipped.values())}, truncated {counts.truncated}, "
            f"dropped {counts.dropped}")


def _summary(stats: DataStats) -> str:
    text = (f"{stats.format}, {stats.rows} training examples ({stats.tokens} tokens, "
            f"{stats.trained_tokens} trained), {stats.val_rows} held out; skipped "
            f"{stats.skipped_rows}, truncated {stats.truncated_rows}, dropped {stats.dropped_rows}")
    if stats.packed_sequences is not None:
        text += (f"; packed into {stats.packed_sequences} rows of {stats.max_seq_len} "
                 f"({stats.packing_efficiency:.1%} full, isolation: {stats.isolation})")
    return text
