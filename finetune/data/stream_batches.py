"""The resumable micro-batches of a streaming run: read lazily, tokenize and pack on the fly.

Rows are read in buffers of `data.stream_buffer` examples. Each buffer is tokenized, packed
(best-fit-decreasing, when packing) and shuffled with a seed from (seed, epoch, buffer number),
so memory stays flat however large the data is. The state after a batch is a cursor: the epoch,
the buffer number, where every source stood when that buffer started (byte offsets for
.jsonl/.csv/.txt, record numbers otherwise) and how many units of the buffer were consumed.
Resuming reopens the files at those offsets and rebuilds one buffer: O(buffer), not O(data).

The global stream does not depend on the world size: every rank reads it and takes its slice of
each W * B units (the same rule as in memory), so a resume on another number of ranks continues
at the same unit. Several sources are read one after the other; with `data.weights` they are
interleaved row by row in proportion to the weights and the epoch ends when one of them runs out.
Held-out rows (without data.val_path) are a fixed hash of each row's place in its source
(`is_held_out`); `RowStream` reads them, or the training rows, from any cursor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.config.data import DataConfig
from finetune.data.collate import Collator, Document
from finetune.data.encode import Encoder
from finetune.data.errors import DataError, RowOrigin
from finetune.data.formats import Example, RowConverter
from finetune.data.ingest import ENCODE_BATCH, examples_from
from finetune.data.packing import pack_documents
from finetune.data.sampler import rank_slice
from finetune.data.sources import Source, SourcePosition
from finetune.data.tokenized import RowCounts, TokenizedRows


def is_held_out(source_index: int, file_index: int, row_number: int, val_split: float) -> bool:
    """A fixed pseudo-random choice of `val_split` of the rows, by their place in the source."""
    if val_split <= 0:
        return False
    h = (source_index * 0x9E3779B1 + file_index * 0x85EBCA77 + row_number * 0xC2B2AE3D)
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    return (h ^ (h >> 12)) / 2**32 < val_split


class RowStream:
    """Examples from the sources, one after another or interleaved by weight, from a state
    (`state()` of an earlier stream, or None: the start). `held_out`: None gives every row,
    True only the held-out ones, False only the others."""

    def __init__(self, sources: list[Source], converters: list[RowConverter],
                 weights: list[float] | None, state: dict | None, counts: RowCounts,
                 on_bad_row: str, held_out: bool | None, val_split: float) -> None:
        self.sources, self.converters, self.weights = sources, converters, weights
        self.counts, self.on_bad_row = counts, on_bad_row
        self.held_out, self.val_split = held_out, val_split
        n = len(sources)
        state = state or {}
        self.positions = [SourcePosition.from_dict(p) if p else None
                          for p in state.get("positions", [None] * n)]
        self.taken = list(state.get("taken", [0] * n))
        self.done = list(state.get("done", [False] * n))
        self._iters: list[Iterator | None] = [None] * n

    def state(self) -> dict:
        return {"positions": [p.to_dict() if p else None for p in self.positions],
                "taken": list(self.taken), "done": list(self.done),
                "counts": self.counts.to_dict()}

    def _pick(self) -> int | None:
        live = [i for i in range(len(self.sources)) if not self.done[i]]
        if self.weights is None:
            return live[0] if live else None
        if len(live) < len(self.sources):
            return None  # with weights the epoch ends when one source runs out
        live = [i for i in live if self.weights[i] > 0]
        return min(live, key=lambda i: ((self.taken[i] + 1) / self.weights[i], i)) if live else None

    def next(self) -> tuple[Example, RowOrigin] | None:
        while True:
            i = self._pick()
            if i is None:
                return None
            if self._iters[i] is None:
                rows = self.sources[i].rows(self.positions[i])
                self._iters[i] = examples_from(rows, self.converters[i], self.counts,
                                               self.on_bad_row)
            item = next(self._iters[i], None)
            if item is None:
                self.done[i] = True
                continue
            example, origin, position = item
            self.positions[i] = position
            self.taken[i] += 1
            if self.held_out is None or self.held_out == is_held_out(
                    i, position.file_index, origin.index, self.val_split):
                return example, origin


@dataclass
class _Buffer:
    epoch: int
    number: int
    start: dict  # the RowStream state this buffer was read from
    rows: TokenizedRows
    units: list[list[int]]


class StreamingTrainBatches:
    """Same interface as TrainBatches; `samples_per_epoch` is None (not known up front).

    `held_out`: None reads every row, False only the rows `is_held_out` leaves for training.
    `counts` tallies the first epoch's rows as read so far.
    """

    samples_per_epoch = None

    def __init__(self, cfg: DataConfig, sources: list[Source], converters: list[RowConverter],
                 weights: list[float] | None, encoder: Encoder, collator: Collator, *,
                 seed: int, micro_batch_size: int, rank: int, world_size: int,
                 held_out: bool | None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size}")
        self.cfg, self.sources, self.converters, self.weights = cfg, sources, converters, weights
        self.encoder, self.collator, self.seed = encoder, collator, seed
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.held_out = held_out
        self.counts = RowCounts()
        self._position = 0
        self._cursor: dict[str, Any] = {"epoch": 0, "buffer": 0, "start": None, "consumed": 0}

    @property
    def epoch(self) -> int:
        return int(self._cursor["epoch"])

    @property
    def position(self) -> int:
        return self._position

    def _read_buffer(self, stream: RowStream, epoch: int, number: int) -> tuple[_Buffer, bool]:
        """The next buffer, and whether the stream ran out while reading it."""
        start = stream.state()
        examples = []
        exhausted = False
        while len(examples) < self.cfg.stream_buffer:
            item = stream.next()
            if item is None:
                exhausted = True
                break
            examples.append(item)
        chunks = (examples[i:i + ENCODE_BATCH] for i in range(0, len(examples), ENCODE_BATCH))
        rows = TokenizedRows.concat(list(self.encoder.encode_batches(chunks, stream.counts)))
        if self.cfg.packing:
            units = pack_documents(rows.lengths, self.cfg.max_seq_len)
        else:
            units = [[i] for i in range(len(rows))]
        if self.cfg.shuffle:
            rng = np.random.default_rng((self.seed, epoch, number))
            units = [units[i] for i in rng.permutation(len(units))]
        return _Buffer(epoch, number, start, rows, units), exhausted

    def _buffers(self, epoch: int, number: int, start: dict | None) -> Iterator[_Buffer]:
        """Non-empty buffers from (epoch, number, start), epoch after epoch."""
        while True:
            fresh = number == 0 and start is None
            # Row counts describe the data once: only the first epoch's reading adds to them.
            counts = self.counts if epoch == 0 else RowCounts()
            stream = RowStream(self.sources, self.converters, self.weights, start, counts,
                                self.cfg.on_bad_row, self.held_out, float(self.cfg.val_split))
            produced = False
            exhausted = False
            while not exhausted:
                buffer, exhausted = self._read_buffer(stream, epoch, number)
                number += 1
                if buffer.units:
                    produced = True
                    yield buffer
            if fresh and not produced:
                raise DataError(
                    f"no usable training rows in {', '.join(s.spec for s in self.sources)}: "
                    f"{self.counts.read} read, {sum(self.counts.skipped.values())} skipped, "
                    f"{self.counts.dropped} dropped (data.max_seq_len={self.cfg.max_seq_len})")
            epoch, number, start = epoch + 1, 0, None

    def _units(self, cursor: dict) -> Iterator[tuple[list[Document], dict]]:
        """Global units from `cursor`, each with the cursor of the unit after it."""
        buffers = self._buffers(cursor["epoch"], cursor["buffer"], cursor["start"])
        current, skip = next(buffers), cursor["consumed"]
        while True:
            following = next(buffers)  # read ahead so the last unit's cursor is exact
            for k in range(skip, len(current.units)):
                if k + 1 < len(current.units):
                    after = {"epoch": current.epoch, "buffer": current.number,
                             "start": current.start, "consumed": k + 1}
                else:
                    after = {"epoch": following.epoch, "buffer": following.number,
                             "start": following.start, "consumed": 0}
                yield [current.rows.example(d) for d in current.units[k]], after
            current, skip = following, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        units = self._units(self._cursor)
        step = self.world_size * self.micro_batch_size
        mine = rank_slice(0, self.rank, self.world_size, self.micro_batch_size)
        while True:
            group = list(itertools.islice(units, step))
            batch = self.collator([group[i][0] for i in mine])
            self._cursor = group[-1][1]
            self._position += step
            yield batch

    def state_dict(self) -> dict[str, Any]:
        # Counts up to the cursor's buffer (re-read on resume), or all of epoch 0 once past it.
        start = self._cursor["start"]
        counts = start["counts"] if self.epoch == 0 and start else self.counts.to_dict()
        return {"epoch": self.epoch, "position": self._position, "stream": self._cursor,
                "seed": self.seed, "counts": counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            raise DataError("this checkpoint was not written with data.streaming=true; resume "
                            "with the same data.streaming setting")
        if state.get("seed", self.seed) != self.seed:
            raise DataError("the checkpoint's data order used another seed; resume with it")
        start = state["stream"].get("start")
        if start is not None and len(start["positions"]) != len(self.sources):
            raise DataError(f"the checkpoint read {len(start['positions'])} data.path entries, "
                            f"this run has {len(self.sources)}; resume with the same data.path")
        self._position = int(state["position"])
        self._cursor = dict(state["stream"])
        if state.get("counts"):
            self.counts = RowCounts.from_dict(state["counts"])
