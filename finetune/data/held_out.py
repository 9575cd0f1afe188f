"""Held-out batches for one rank, the same way for in-memory and streaming data.

The held-out units are sharded like training steps: step g gives rank r the units
[g * W * B + r * B, ... + B). Every rank gets the same number of batches, so evaluation needs no
uneven collectives; where the units run out, a rank gets one copy of the first unit with every
label masked, which adds no tokens to the loss.
"""

from __future__ import annotations

import numpy as np

from finetune.data.collate import Collator
from finetune.data.tokenized import TokenizedRows


def held_out_batches(rows: TokenizedRows, units: list[list[int]] | None, collator: Collator, *,
                     micro_batch_size: int, rank: int, world_size: int,
                     max_batches: int | None) -> list[dict]:
    """Collated held-out batches of this rank (see the module); `units` are packed rows as
    lists of example indices (None: one example per unit); at most `max_batches`."""
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
