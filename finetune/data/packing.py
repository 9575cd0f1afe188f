"""Packing documents into fixed-length rows, and which attention keeps them apart.

`pack_documents` is best-fit-decreasing bin packing: documents are placed longest first, each
into the fullest row that still has room for it (the row with the least room left that fits),
or into a new row. Rows never exceed `max_seq_len` and documents are never split.

`packing_isolation(attention)` says how a packed batch keeps documents from attending to each
other for an attention implementation; each attention candidate in the kernel registry
(finetune.kernels.attention) declares it:

- `varlen`: flash-attention kernels; the batch is flattened to one row and position_ids restart
  at 0 for each document; transformers derives the cu_seqlens of the varlen kernel from them.
- `block_mask_4d`: sdpa and eager; a block-diagonal causal float mask [B, 1, T, T], 0 where attention
  is allowed and the dtype's minimum where it is blocked (transformers passes a 4D mask through
  unchanged; eager adds it to the scores, so a bool mask would be misread there).
- `flex_block_mask`: flex_attention; a BlockMask with the same pattern.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from finetune.data.errors import DataError
from finetune.kernels.attention import ATTENTION
from finetune.kernels.attention import packing_isolation as attention_packing_isolation


def packing_isolation(attention: str) -> str:
    """How packed documents are kept apart for `attention` (varlen | block_mask_4d |
    flex_block_mask), as the kernel registry declares it; DataError if they cannot be."""
    isolation = attention_packing_isolation(attention)
    if isolation is not None:
        return isolation
    if attention == "auto":
        raise DataError("packing needs the resolved attention implementation, not 'auto' "
                        "(the kernel plan resolves it; pass the plan's choice)")
    able = [name for name in ATTENTION.names() if attention_packing_isolation(name)]
    raise DataError(f"data.packing=true cannot keep packed documents apart with attention "
                    f"{attention!r}: documents would attend to each other. Use one of "
                    f"{', '.join(able)} (kernels.attention=...) or set data.packing=false")


def pack_documents(lengths: Sequence[int] | np.ndarray, max_seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing packing of documents (by length) into rows of `max_seq_len` tokens.

    Returns rows as lists of document indices, in the order rows were opened; within a row,
    documents keep the order they were placed in. Deterministic: ties break by index.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > max_seq_len:
        raise DataError(f"a document of {int(lengths.max())} tokens does not fit "
                        f"data.max_seq_len={max_seq_len}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rows: list[list[int]] = []
    # Rows indexed by their free room; `rooms` is the sorted list of room sizes that have rows.
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    bisect_left, insort = bisect.bisect_left, bisect.insort
    for doc, size in zip(order.tolist(), lengths[order].tolist(), strict=True):
        at = bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            bucket = by_room[room]
            row = bucket.pop()
            if not bucket:
                del by_room[room]
                del rooms[at]
        else:
            room = max_seq_len
            row = len(rows)
            rows.append([])
        rows[row].append(doc)
        left = room - size
        if left > 0:
            bucket = by_room.get(left)
            if bucket is None:
                by_room[left] = [row]
                insort(rooms, left)
            else:
                bucket.append(row)
    return rows


def packing_efficiency(total_tokens: int, rows: int, max_seq_len: int) -> float:
    """Real tokens over the tokens the packed rows could hold."""
    return total_tokens / (rows * max_seq_len) if rows else 0.0
