"""TrainData of preference pairs (the dpo recipe): batches that hold both answers of each pair.

A micro-batch of n pairs is one padded batch of 2n rows, so the policy scores chosen and rejected
answers in ONE forward pass: rows [0, n) are the chosen completions of pairs 0..n-1 and rows
[n, 2n) their rejected ones, in the same order. Besides the usual `input_ids`, `labels`,
`position_ids` and `attention_mask` the batch holds

- `pair_mask` [n] bool: the pair has a trained token in both rows (False only for the filler
  pair that keeps held-out batches equal in number across ranks); the loss counts these pairs;
- `pair_ids` [n] int64: each pair's index (training pairs first, then the held-out ones), the
  key of reference log-probabilities computed once (dpo.precompute_ref).

The order, sharding, epochs and resume are those of `TrainBatches` with a pair as the unit, so a
resumed run continues at the same pair. `pair_batches` walks every pair once, in order, for
precomputation. Rows are held out by pair (data.val_split or data.val_path).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from finetune.config.data import DataConfig
from finetune.data.collate import IGNORE_INDEX, Collator, Document
from finetune.data.encode import Encoder
from finetune.data.errors import DataError
from finetune.data.in_memory import SPLIT_SEED
from finetune.data.ingest import SourceTokens, source_key
from finetune.data.length import choose_max_seq_len, context_hint, warn_if_many_cut
from finetune.data.pairs import (
    IDENTICAL,
    IDENTICAL_MESSAGE,
    PAIR_FORMAT,
    check_pair_settings,
    cut_pairs,
    encode_pair_source,
    pair_key,
    pair_lengths,
    select_pairs,
)
from finetune.data.sampler import TrainBatches, rank_slice
from finetune.data.sources import Source
from finetune.data.tokenized import RowCounts, TokenizedRows
from finetune.data.train_data import DataStats

logger = logging.getLogger(__name__)


class PairCollator:
    """Collates pairs (each [chosen, rejected] documents) into one batch (see the module)."""

    def __init__(self, base: Collator) -> None:
        if base.isolation is not None:
            raise ValueError("preference pairs are collated as padded rows, without packing")
        self.base = base

    def __call__(self, pairs: list[list[Document]]) -> dict[str, Any]:
        rows = [[chosen] for chosen, _ in pairs] + [[rejected] for _, rejected in pairs]
        batch = self.base(rows)
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)
        n = len(pairs)
        batch["pair_mask"] = scored[:n] & scored[n:]
        return batch


def scored_pairs(batch: dict) -> int:
    """The pairs a preference batch scores (what the DPO loss is normalised by)."""
    return int(batch["pair_mask"].sum())


class PairBatches(TrainBatches):
    """`TrainBatches` over pairs, each batch also carrying its `pair_ids`."""

    def batch_at(self, start: int) -> dict[str, Any]:
        positions = rank_slice(start, self.rank, self.world_size, self.micro_batch_size)
        units = [self._unit_at(p) for p in positions]
        batch = self.collator([self.documents(u) for u in units])
        batch["pair_ids"] = torch.tensor(units, dtype=torch.int64)
        return batch


def _pair_units(n_pairs: int) -> list[list[int]]:
    return [[2 * i, 2 * i + 1] for i in range(n_pairs)]


class PreferenceData:
    """TrainData (finetune.data.train_data) of preference pairs held in memory."""

    chat_template: str = ""  # set by build_data

    def __init__(self, train: PairBatches, stats: DataStats, val_rows: TokenizedRows, *,
                 micro_batch_size: int, rank: int, world_size: int) -> None:
        self.train = train
        self._stats = stats
        self._val_rows = val_rows
        self._micro_batch_size, self._rank, self._world_size = micro_batch_size, rank, world_size

    @property
    def stats(self) -> DataStats:
        return self._stats

    @property
    def num_pairs(self) -> int:
        """Training pairs (one epoch)."""
        return len(self.train.rows) // 2

    def val_batches(self, max_batches: int | None = None) -> list[dict]:
        """Held-out pairs, sharded as finetune.data.held_out shards rows (a rank whose share
        runs out gets one filler pair with `pair_mask` False); `pair_ids` continue after the
        training pairs'."""
        n_val = len(self._val_rows) // 2
        if not n_val:
            return []
        step = self._world_size * self._micro_batch_size
        n_batches = -(-n_val // step)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        batches = []
        for g in range(n_batches):
            start = g * step + self._rank * self._micro_batch_size
            ids = list(range(start, min(start + self._micro_batch_size, n_val)))
            pairs = [self._val_pair(i) for i in ids]
            if not ids:
                ids, pairs = [0], [[(t, np.zeros_like(m)) for t, m in self._val_pair(0)]]
            batch = self.train.collator(pairs)
            batch["pair_ids"] = torch.tensor(ids, dtype=torch.int64) + self.num_pairs
            batches.append(batch)
        return batches

    def _val_pair(self, i: int) -> list[Document]:
        return [self._val_rows.example(2 * i), self._val_rows.example(2 * i + 1)]

    def preview(self, n: int = 1) -> list[Document]:
        """The first n sequences of the training pairs in file order: chosen, rejected, ..."""
        rows = self.train.rows
        return [rows.example(i) for i in range(min(n, len(rows)))]

    @property
    def num_all_pairs(self) -> int:
        """Training and held-out pairs: the range of `pair_ids`."""
        return self.num_pairs + len(self._val_rows) // 2

    def pair_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every pair once, training then held-out, in order, `batch_size` at a time, with
        `pair_ids` (0 .. num_all_pairs - 1)."""
        for start in range(0, self.num_all_pairs, batch_size):
            ids = list(range(start, min(start + batch_size, self.num_all_pairs)))
            pairs = [self.train.documents(i) if i < self.num_pairs
                     else self._val_pair(i - self.num_pairs) for i in ids]
            batch = self.train.collator(pairs)
            batch["pair_ids"] = torch.tensor(ids, dtype=torch.int64)
            yield batch


def build_preference_data(cfg: DataConfig, sources: list[Source], val_sources: list[Source],
                          encoder: Encoder, collator: Collator, *, tokenizer_hash: str,
                          seed: int, micro_batch_size: int, rank: int, world_size: int,
                          template_from: str, auto_cap: int | None = None,
                          context: int | None = None) -> PreferenceData:
    """Encode (or load) the pairs of every source, cut them to the length in force, hold some
    out and order the rest. `encoder` must train only the last assistant turn (the completion).
    With `auto_cap` (data.max_seq_len=auto) the pairs were encoded with that limit and are cut
    to the length 99% of pairs fit in; `context` is the model's context length, if known.
    Pairs whose two answers are identical are left out with a warning. Raises DataError when no
    training pair is left, or none carries a preference signal."""
    check_pair_settings(cfg)

    def encode(source: Source) -> SourceTokens:
        return encode_pair_source(encoder, source, cfg,
                                  pair_key(source_key(source, cfg, tokenizer_hash)))

    loaded = [encode(s) for s in sources]
    val_loaded = [encode(s) for s in val_sources]
    length_from = "data.max_seq_len"
    if auto_cap is not None:
        lengths = np.concatenate([pair_lengths(s.rows) for s in loaded])
        choice = choose_max_seq_len(lengths, auto_cap, cfg.truncation)
        for s in loaded + val_loaded:
            s.rows = cut_pairs(s.rows, choice.length, cfg.truncation, s.counts)
        cfg, length_from = replace(cfg, max_seq_len=choice.length), choice.source
    if val_sources:
        train_rows = TokenizedRows.concat([s.rows for s in loaded])
        val_rows = TokenizedRows.concat([s.rows for s in val_loaded])
    else:
        train_parts, val_parts = [], []
        for s in loaded:
            train_idx, val_idx = _split(len(s.rows) // 2, float(cfg.val_split))
            train_parts.append(select_pairs(s.rows, train_idx))
            val_parts.append(select_pairs(s.rows, val_idx))
        train_rows, val_rows = TokenizedRows.concat(train_parts), TokenizedRows.concat(val_parts)
    counts = RowCounts()
    for s in loaded + val_loaded:
        counts.merge(s.counts)
    where = ", ".join(s.source.spec for s in loaded)
    if not len(train_rows):
        read = RowCounts()
        for s in loaded:
            read.merge(s.counts)
        raise _no_pairs(where, read, cfg, context)
    warn_identical(counts, ", ".join(s.source.spec for s in loaded + val_loaded))
    fingerprint = hashlib.sha256(repr(([s.key for s in loaded], [s.key for s in val_loaded],
                                       cfg.val_split, PAIR_FORMAT)).encode()).hexdigest()
    train = PairBatches(train_rows, _pair_units(len(train_rows) // 2), PairCollator(collator),
                        seed=seed, shuffle=cfg.shuffle, micro_batch_size=micro_batch_size,
                        rank=rank, world_size=world_size, fingerprint=fingerprint[:16])
    stats = DataStats(
        format=PAIR_FORMAT, rows=len(train_rows) // 2, val_rows=len(val_rows) // 2,
        tokens=int(train_rows.offsets[-1]),
        trained_tokens=int(np.count_nonzero(train_rows.trained)),
        skipped_rows=sum(counts.skipped.values()), truncated_rows=counts.truncated,
        dropped_rows=counts.dropped, packed_sequences=None, packing_efficiency=None,
        max_seq_len=cfg.max_seq_len, max_seq_len_from=length_from, template=template_from,
        rows_read=counts.read, skip_reasons=dict(counts.skipped),
        sources=[{"path": s.source.spec, "format": PAIR_FORMAT, "examples": len(s.rows) // 2,
                  "read": s.counts.read, "skipped": sum(s.counts.skipped.values()),
                  "from_cache": s.from_cache} for s in loaded])
    logger.info("data: %d preference pairs (%d tokens, %d trained), %d held out; skipped %d, "
                "truncated %d, dropped %d pairs", stats.rows, stats.tokens,
                stats.trained_tokens, stats.val_rows, stats.skipped_rows, stats.truncated_rows,
                stats.dropped_rows)
    warn_if_many_cut(counts, cfg.max_seq_len, length_from, context=context, unit="pairs")
    return PreferenceData(train, stats, val_rows, micro_batch_size=micro_batch_size, rank=rank,
                          world_size=world_size)


def _split(n: int, val_split: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out pair indices, chosen with the fixed split seed of all data."""
    n_val = min(int(round(n * val_split)), max(n - 1, 0))
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _identical_examples(counts: RowCounts) -> str:
    found = [s.removesuffix(f": {IDENTICAL_MESSAGE}") for s in counts.first_skips
             if s.endswith(IDENTICAL_MESSAGE)]
    return f" (e.g. {', '.join(found[:3])})" if found else ""


def warn_identical(counts: RowCounts, where: str) -> None:
    """Warn with the count and the first file:line of pairs left out as identical."""
    same = counts.skipped.get(IDENTICAL, 0)
    if same:
        logger.warning("%d of %d pairs in %s have the same 'chosen' and 'rejected' completion%s: "
                       "such a pair carries no preference signal (its DPO gradient is exactly "
                       "0), so these are left out and counted as skipped (%s). Give them a "
                       "rejected answer that differs from the chosen one.", same, counts.read,
                       where, _identical_examples(counts), IDENTICAL)


def _no_pairs(where: str, counts: RowCounts, cfg: DataConfig,
              context: int | None) -> DataError:
    same = counts.skipped.get(IDENTICAL, 0)
    if same:
        others = counts.read - same
        return DataError(
            f"no preference pair in {where} carries a signal: in {same} of the {counts.read} "
            f"pairs read, 'chosen' and 'rejected' give the same completion"
            f"{_identical_examples(counts)} (two empty answers are the same too), so DPO would "
            f"train with a gradient of exactly 0 on every step"
            + (f"; the other {others} were skipped or dropped" if others else "")
            + ". Give each row a rejected answer that differs from its chosen one.")
    reasons = ", ".join(f"{k}: {v}" for k, v in counts.skipped.items()) or "none"
    first = f" First problem: {counts.first_skips[0]}" if counts.first_skips else ""
    return DataError(f"no usable preference pairs in {where}: {counts.read} rows read, "
                     f"{sum(counts.skipped.values())} skipped ({reasons}), {counts.dropped} pairs "
                     f"dropped (data.truncation={cfg.truncation}, data.max_seq_len="
                     f"{cfg.max_seq_len})."
                     f"{context_hint(counts, cfg.max_seq_len, context, unit='pairs')}"
                     f"{first}")
