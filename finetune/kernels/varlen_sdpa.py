"""`sdpa_varlen`: torch SDPA run once per document, on rows without padding.

Batches for this attention are flattened (finetune.data.collate, `varlen`): one row [1, N] with
no padding, `position_ids` restarting at 0 where each document starts, and the documents'
lengths as Python ints (`document_lengths`, computed by the collator on the host; transformers
hands the forward's keyword arguments to every attention call), so no layer reads a boundary
back from the device. Without them (the self-check, a caller passing only `position_ids`) the
lengths are read from `position_ids`, once per forward. Each document then runs
`F.scaled_dot_product_attention(is_causal=True)` on its own slice, so no query ever attends to
another document and nothing is spent on the [N, N] pairs a block-diagonal mask would throw
away, nor on padding. On a 2-core AVX512-BF16 Xeon (torch 2.13, fp32, 30M-parameter Llama,
LoRA; `python scripts/bench_layout.py --size medium`), the same unpacked micro-batches took
1.81x less CPU flattened this way than padded, with the same losses; packed rows of 512 took
1.10x less than with their 4D mask.

Calls that are not such a training row (generation with a KV cache, left-padded prompts) take
one SDPA call with the causal and padding mask built here: transformers hands this attention
the 2D padding mask it gives the flash-attention implementations (`flash_attention_mask`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from finetune.kernels.sdpa import sdpa_forward

VARLEN_SDPA = "sdpa_varlen"
# The forward keyword (a batch key) with a flattened row's document lengths as Python ints.
DOCUMENT_LENGTHS = "document_lengths"


def register_varlen_sdpa() -> None:
    """Make `attn_implementation="sdpa_varlen"` loadable by transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, flash_attention_mask)


def document_lengths(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """The lengths of the documents of a flattened row, from its `position_ids` [1, N] (a
    document starts where they are 0); None when they do not describe one (absent, several
    rows, or not starting at 0, as in a continuation)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    row = position_ids[0]
    if row.shape[0] != length or int(row[0]) != 0:
        return None
    starts = torch.nonzero(row == 0).flatten().tolist()
    return [end - start for start, end in zip(starts, [*starts[1:], length], strict=True)]


class _LengthsOfLastRow:
    """`document_lengths` of the last row seen, reused while the same `position_ids` tensor,
    unchanged, comes back: every layer of one forward passes the same tensor, and reading the
    lengths to the host is a device sync on a GPU. Held by weak reference, so a new tensor
    (even at a freed one's address) is never mistaken for it; an in-place change bumps the
    tensor's version and is read again."""

    def __init__(self) -> None:
        self._row: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._length = -1
        self._lengths: list[int] | None = None

    def __call__(self, position_ids: torch.Tensor | None, length: int) -> list[int] | None:
        if position_ids is None:
            return None
        if (self._row is not None and self._row() is position_ids
                and self._version == position_ids._version and self._length == length):
            return self._lengths
        lengths = document_lengths(position_ids, length)
        self._row, self._version = weakref.ref(position_ids), position_ids._version
        self._length, self._lengths = length, lengths
        return lengths


_row_lengths = _LengthsOfLastRow()


def _training_row_lengths(kwargs: dict[str, Any], length: int) -> list[int] | None:
    """The documents of a flattened training row: the collator's host-side lengths when they
    describe this row, else read from its `position_ids`."""
    given = kwargs.get(DOCUMENT_LENGTHS)
    if given is not None and sum(given) == length:
        return list(given)
    return _row_lengths(kwargs.get("position_ids"), length)


def causal_padding_mask(padding: torch.Tensor | None, q_len: int, k_len: int,
                        device: torch.device, *, causal: bool = True,
                        window: int | None = None) -> torch.Tensor:
    """Boolean [B|1, 1, q_len, k_len] mask: the queries are the last q_len of the k_len
    positions; a key is allowed when it is not padding, if `causal` not after its query, and
    with a sliding `window` fewer than `window` positions before it (transformers' rule). A
    query's own position is always allowed, so a left-padding query row is never fully masked
    (SDPA would give NaN there, and NaN values leak through masked keys)."""
    queries = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    keys = torch.arange(k_len, device=device)[None, :]
    allowed = keys <= queries if causal else torch.ones_like(keys == queries)
    if window is not None:
        allowed = allowed & (queries - keys < window)
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, -k_len:].to(device=device, dtype=torch.bool)
    return allowed | (keys == queries)[None, None]


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (b, h, s, d) in, (b, s, h, d) out.
    `sliding_window` (Mistral, Qwen2 and others pass it) is honoured; logit soft-capping and
    attention sinks, which SDPA cannot express, are refused."""
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"sdpa_varlen cannot apply {unsupported} (this model uses it): "
                             f"set kernels.attention=eager")
    q_len, k_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    lengths = (_training_row_lengths(kwargs, q_len)
               if attention_mask is None and causal and q_len == k_len and query.shape[0] == 1
               else None)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               padding: torch.Tensor | None) -> torch.Tensor:
        ql, kl = q.shape[2], k.shape[2]
        if padding is None and (window is None or kl <= window) and (
                ql == kl or ql == 1 or not causal):
            # A whole causal row, one decoded token (it sees every cached key), no causality.
            return sdpa_forward(q, k, v, scaling, causal=causal and ql == kl > 1,
                                dropout=dropout)
        mask = causal_padding_mask(padding, ql, kl, q.device, causal=causal, window=window)
        return sdpa_forward(q, k, v, scaling, mask=mask, causal=False, dropout=dropout)

    if lengths is not None:
        parts = [attend(q, k, v, None)
                 for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                    value.split(lengths, dim=2), strict=True)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    else:
        out = attend(query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None
