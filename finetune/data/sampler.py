"""The training order: a seeded permutation per epoch, sharded by rank, resumable in O(1).

Training units are examples, or packed rows when packing. Epoch e visits the units in a
permutation seeded by (seed, e). A global position p counts units consumed by all ranks
together; unit p is `permutation(p // n)[p % n]`. Each step consumes W * B consecutive global
units, and rank r takes the slice [r * B, (r + 1) * B) of them. Because the state is the global
position, a run resumed with another world size or micro-batch size carries on from the same
unit. A step that runs past the end of an epoch takes the rest from the next epoch's permutation
(no partial batch, nothing dropped); `epoch` in the state says which epoch the next unit is in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from finetune.data.collate import Collator, Document
from finetune.data.errors import DataError
from finetune.data.tokenized import TokenizedRows


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of n units in an epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def rank_slice(start: int, rank: int, world_size: int, micro_batch_size: int) -> range:
    """Global positions rank `rank` takes from the step that starts at position `start`."""
    first = start + rank * micro_batch_size
    return range(first, first + micro_batch_size)


class TrainBatches:
    """Iterates collated micro-batches for one rank, epoch after epoch, forever.

    `state_dict()` after k batches is {"epoch", "position", ...} with position = k * W * B
    (plus the position it was resumed from); `load_state_dict` restores it without replaying.
    """

    def __init__(self, rows: TokenizedRows, units: list[list[int]] | None, collator: Collator,
                 *, seed: int, shuffle: bool, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, fingerprint: str = "") -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size}")
        if micro_batch_size < 1:
            raise DataError(f"trainer.micro_batch_size={micro_batch_size} must be at least 1")
        self.rows, self.units, self.collator = rows, units, collator
        self.seed, self.shuffle, self.fingerprint = seed, shuffle, fingerprint
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.samples_per_epoch: int | None = len(units) if units is not None else len(rows)
        if not self.samples_per_epoch:
            raise DataError("the training set is empty; check data.path and data.val_split")
        self._position = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def position(self) -> int:
        return self._position

    @property
    def epoch(self) -> int:
        return self._position // self.samples_per_epoch

    def _unit_at(self, position: int) -> int:
        epoch, index = divmod(position, self.samples_per_epoch)
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self.samples_per_epoch, self.seed, epoch,
                                              self.shuffle)
        return int(self._orders[epoch][index])

    def documents(self, unit: int) -> list[Document]:
        doc_ids = self.units[unit] if self.units is not None else [unit]
        return [self.rows.example(d) for d in doc_ids]

    def batch_at(self, start: int) -> dict[str, Any]:
        """The micro-batch this rank gets for the step that starts at global position `start`."""
        positions = rank_slice(start, self.rank, self.world_size, self.micro_batch_size)
        return self.collator([self.documents(self._unit_at(p)) for p in positions])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.batch_at(self._position)
            self._position += self.world_size * self.micro_batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self._position,
                "samples_per_epoch": self.samples_per_epoch, "seed": self.seed,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global position (O(1)); the data must be the same."""
        if state.get("samples_per_epoch") != self.samples_per_epoch:
            raise DataError(
                f"the checkpoint's data had {state.get('samples_per_epoch')} samples per epoch, "
                f"this run has {self.samples_per_epoch}: the data or the data settings changed "
                "since the checkpoint. Resume with the same data.* settings")
        if state.get("fingerprint") and self.fingerprint and state["fingerprint"] != self.fingerprint:
            raise DataError("the checkpoint was written for different data (fingerprint "
                            "mismatch); resume with the same data files and data.* settings")
        if state.get("seed", self.seed) != self.seed or state.get("shuffle", self.shuffle) != self.shuffle:
            raise DataError("the checkpoint's data order used another seed or data.shuffle; "
                            "resume with the same seed")
        self._position = int(state["position"])
