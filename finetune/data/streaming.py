"""TrainData for data.streaming=true: nothing is read up front.

Training batches come from `StreamingTrainBatches` (finetune.data.stream_batches): buffers read,
tokenized, packed and shuffled on the fly, resumable from a cursor. Held-out batches read the
stream from the start (data.val_path, or the rows `is_held_out` picks from data.path) until
they have enough for the batches asked for; the preview reads the first training rows.
Statistics are the row counts read so far; rows and tokens are unknown (None).
"""

from __future__ import annotations

import logging

from finetune.config.data import DataConfig
from finetune.data.collate import Collator, Document
from finetune.data.encode import Encoder
from finetune.data.formats import RowConverter
from finetune.data.held_out import held_out_batches
from finetune.data.ingest import ENCODE_BATCH, source_converter
from finetune.data.packing import pack_documents
from finetune.data.sources import Source
from finetune.data.stream_batches import RowStream, StreamingTrainBatches
from finetune.data.tokenized import RowCounts, TokenizedRows
from finetune.data.train_data import DataStats

logger = logging.getLogger(__name__)


def converters_for(sources: list[Source], cfg: DataConfig) -> tuple[list[str], list[RowConverter]]:
    """Each source's format name and row converter (data.format, or detected)."""
    pairs = [source_converter(s, cfg) for s in sources]
    return [name for name, _ in pairs], [conv for _, conv in pairs]


class StreamingData:
    """TrainData (finetune.data.train_data) that reads its sources lazily (see the module).
    The arguments are build_data's, once resolved: `weights` from data.weights, `isolation`
    for packing, `template_from` for the stats."""

    chat_template: str = ""  # set by build_data

    def __init__(self, cfg: DataConfig, sources: list[Source], weights: list[float] | None,
                 val_sources: list[Source], encoder: Encoder, collator: Collator, *, seed: int,
                 micro_batch_size: int, rank: int, world_size: int, template_from: str,
                 isolation: str | None) -> None:
        self.cfg, self.sources, self.encoder, self.collator = cfg, sources, encoder, collator
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.template_from, self.isolation = template_from, isolation
        self.formats, self.converters = converters_for(sources, cfg)
        self._split_rows = not val_sources and float(cfg.val_split) > 0
        self.train = StreamingTrainBatches(
            cfg, sources, self.converters, weights, encoder, collator, seed=seed,
            micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
            held_out=False if self._split_rows else None)
        self._has_val = bool(val_sources) or self._split_rows
        if val_sources:
            self._val_from: tuple[list[Source], list[RowConverter], bool | None] = (
                val_sources, converters_for(val_sources, cfg)[1], None)
        else:
            self._val_from = (sources, self.converters, True if self._split_rows else None)
        self._val_memo: dict[int | None, list[dict]] = {}
        logger.info("data: streaming %s (%s), buffers of %d rows%s",
                    ", ".join(s.spec for s in sources), "+".join(dict.fromkeys(self.formats)),
                    cfg.stream_buffer,
                    f", packed with {isolation} isolation" if cfg.packing else "")

    @property
    def stats(self) -> DataStats:
        counts = self.train.counts
        return DataStats(
            format="+".join(dict.fromkeys(self.formats)), rows=None, val_rows=None, tokens=None,
            trained_tokens=None, skipped_rows=sum(counts.skipped.values()),
            truncated_rows=counts.truncated, dropped_rows=counts.dropped, packed_sequences=None,
            packing_efficiency=None, max_seq_len=self.cfg.max_seq_len, streaming=True,
            isolation=self.isolation, template=self.template_from, rows_read=counts.read,
            skip_reasons=dict(counts.skipped),
            sources=[{"path": s.spec, "format": n}
                     for s, n in zip(self.sources, self.formats, strict=True)])

    def val_batches(self, max_batches: int | None = None) -> list[dict]:
        if not self._has_val:
            return []
        if max_batches not in self._val_memo:
            cfg = self.cfg
            units = (None if max_batches is None
                     else max_batches * self.world_size * self.micro_batch_size)
            rows = self._read_from_start(
                *self._val_from, limit=None if cfg.packing else units,
                token_budget=units * cfg.max_seq_len if cfg.packing and units else None)
            packed = pack_documents(rows.lengths, cfg.max_seq_len) if cfg.packing else None
            self._val_memo[max_batches] = held_out_batches(
                rows, packed, self.collator, micro_batch_size=self.micro_batch_size,
                rank=self.rank, world_size=self.world_size, max_batches=max_batches)
        return self._val_memo[max_batches]

    def preview(self, n: int = 1) -> list[Document]:
        rows = self._read_from_start(self.sources, self.converters,
                                     False if self._split_rows else None, limit=n,
                                     token_budget=None)
        return [rows.example(i) for i in range(len(rows))]

    def _read_from_start(self, sources: list[Source], converters: list[RowConverter],
                         held_out: bool | None, *, limit: int | None,
                         token_budget: int | None) -> TokenizedRows:
        """Examples from the start of `sources` (`held_out` as in RowStream): at most `limit`
        examples, or enough for `token_budget` tokens (None: all of them)."""
        stream = RowStream(sources, converters, None, None, RowCounts(), self.cfg.on_bad_row,
                           held_out, float(self.cfg.val_split))
        parts, count, tokens = [], 0, 0
        while (limit is None or count < limit) and (token_budget is None or tokens < token_budget):
            chunk = []
            while len(chunk) < ENCODE_BATCH and (limit is None or count + len(chunk) < limit):
                item = stream.next()
                if item is None:
                    break
                chunk.append(item)
            if not chunk:
                break
            part = self.encoder.encode(chunk, RowCounts())
            parts.append(part)
            count += len(part)
            tokens += int(part.offsets[-1])
        return TokenizedRows.concat(parts)
