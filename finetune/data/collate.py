"""Collating examples into model inputs: padded rows, or packed rows with document isolation.

A batch is a list of rows; a row is a list of documents, each `(token ids, trained flags)`.
Labels are the token ids where trained and -100 elsewhere (not shifted: the model shifts).
Unpacked rows (one document each) are right-padded to the longest row with a 2D
attention_mask. Packed rows follow `packing_isolation` (see finetune.data.packing):

- `block_mask_4d`: attention_mask is [B, 1, T, T] in `mask_dtype`, 0 inside a document's causal
  triangle and the dtype's minimum elsewhere; the padding tail is its own block, so no query row
  is fully masked (which would give NaN).
- `flex_block_mask`: attention_mask is a flex-attention BlockMask with the same pattern.

With a non-CPU `device`, both masks are built there from the per-token document ids: only the
[B, T] ids cross to the device, never a [B, 1, T, T] mask (256 MiB at B=4, T=4096 in float32).
- `varlen`: the batch is flattened to one row [1, N] without padding and without attention_mask;
  position_ids restart at 0 for each document. The document boundaries come with it, computed
  here on the host, as transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`
  gives them: `cu_seq_lens_q`/`cu_seq_lens_k` (int32 offsets [documents + 1], moved to the
  device with the batch, read there by varlen flash kernels) and `max_length_q`/`max_length_k`
  (Python ints); and `document_lengths`, the same lengths as a tuple of Python ints, which
  `sdpa_varlen` splits the row by. Python values pass through the batch mover, DDP and FSDP2
  untouched, so no attention layer reads a boundary back from the device.

Every batch also carries `loss_positions` (int64): the positions whose logits some row's loss
reads (the next token is trained), which `causal_lm_loss` hands the model as `logits_to_keep`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finetune.kernels.varlen_sdpa import DOCUMENT_LENGTHS

Document = tuple[np.ndarray, np.ndarray]
IGNORE_INDEX = -100
# The positions whose logits the loss reads (a batch key the loss takes out; see the module).
LOSS_POSITIONS = "loss_positions"


class Collator:
    """Builds the batch dict the model is called with."""

    def __init__(self, *, pad_id: int, isolation: str | None,
                 mask_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.pad_id, self.isolation, self.mask_dtype = pad_id, isolation, mask_dtype
        self.device = torch.device(device)

    def __call__(self, rows: list[list[Document]]) -> dict[str, Any]:
        if self.isolation == "varlen":
            rows = [[doc for row in rows for doc in row]]
        width = max(sum(len(ids) for ids, _ in row) for row in rows)
        batch = len(rows)
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((batch, width), dtype=np.int64)
        doc_index = np.zeros((batch, width), dtype=np.int64)
        spans: list[list[tuple[int, int]]] = []  # (start, end) of each document, per row
        for b, row in enumerate(rows):
            at = 0
            spans.append([])
            for d, (ids, trained) in enumerate(row):
                n = len(ids)
                input_ids[b, at:at + n] = ids
                labels[b, at:at + n] = np.where(trained, ids, IGNORE_INDEX)
                positions[b, at:at + n] = np.arange(n)
                doc_index[b, at:at + n] = d
                spans[b].append((at, at + n))
                at += n
            # The padding tail: its own document, positions from 0.
            positions[b, at:] = np.arange(width - at)
            doc_index[b, at:] = len(row)
            if at < width:
                spans[b].append((at, width))
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
            LOSS_POSITIONS: torch.from_numpy(
                np.flatnonzero((labels[:, 1:] != IGNORE_INDEX).any(axis=0))),
        }
        if self.isolation == "varlen":
            out.update(sequence_boundaries([end - start for start, end in spans[0]
                                            if end > start]))
        if self.isolation is None:
            lengths = np.array([sum(len(ids) for ids, _ in row) for row in rows])
            out["attention_mask"] = torch.from_numpy(
                (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64))
        elif self.isolation == "block_mask_4d" and self.device.type != "cpu":
            out["attention_mask"] = document_mask(torch.from_numpy(doc_index).to(self.device),
                                                  self.mask_dtype)
        elif self.isolation == "block_mask_4d":
            out["attention_mask"] = block_diagonal_mask(spans, width, self.mask_dtype)
        elif self.isolation == "flex_block_mask":
            out["attention_mask"] = flex_block_mask(torch.from_numpy(doc_index).to(self.device))
        return out


def sequence_boundaries(lengths: list[int]) -> dict[str, Any]:
    """The boundary keys of a flattened row of documents of `lengths` (see the module):
    transformers' flash-attention kwargs, and the lengths as Python ints."""
    offsets = torch.from_numpy(np.cumsum([0, *lengths]).astype(np.int32))
    longest = max(lengths, default=0)
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest,
            "max_length_k": longest, DOCUMENT_LENGTHS: tuple(lengths)}


def block_diagonal_mask(spans: list[list[tuple[int, int]]], width: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where query and key are in the same document (`spans` gives
    each row's documents as (start, end)) and the key is not in the future, the dtype's minimum
    elsewhere. Built block by block in numpy (one thread; a full T x T comparison in torch costs
    ~10x more per batch on a busy CPU); the minimum of `dtype` is exact in float32."""
    blocked = torch.finfo(dtype).min
    mask = np.full((len(spans), 1, width, width), blocked, dtype=np.float32)
    causal = np.triu(np.full((width, width), blocked, dtype=np.float32), 1)
    for b, row in enumerate(spans):
        for start, end in row:
            n = end - start
            mask[b, 0, start:end, start:end] = causal[:n, :n]
    out = torch.from_numpy(mask)
    return out if dtype == torch.float32 else out.to(dtype)


def document_mask(doc_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [B, 1, T, T] mask of `block_diagonal_mask`, built where `doc_index` (the [B, T]
    document number of each token) lives: the same values, from two comparisons."""
    width = doc_index.shape[1]
    positions = torch.arange(width, device=doc_index.device)
    allowed = ((doc_index[:, :, None] == doc_index[:, None, :])
               & (positions[:, None] >= positions[None, :]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_index.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def mask_bytes(isolation: str | None, micro_batch_size: int, width: int,
               dtype: torch.dtype) -> int:
    """Bytes of one micro-batch's dense 4D mask (block_mask_4d), 0 for the other isolations."""
    if isolation != "block_mask_4d":
        return 0
    return micro_batch_size * width * width * torch.finfo(dtype).bits // 8


def flex_block_mask(doc_index: torch.Tensor) -> Any:
    """A flex-attention BlockMask for documents packed in rows (same pattern as above)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, width = doc_index.shape

    def same_document_causal(b, h, q, kv):
        return (doc_index[b, q] == doc_index[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, batch, None, width, width,
                             device=str(doc_index.device))
