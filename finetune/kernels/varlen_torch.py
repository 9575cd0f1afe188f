"""`varlen_attn`: torch's in-tree variable-length attention (`torch.nn.attention.varlen`).

Packed documents reach it as one flattened row [1, N] (finetune.data.collate, `varlen`) and
run through torch's flash kernel with cumulative document offsets (cu_seqlens): no dense
[N, N] mask, no pair across documents computed, and no package beyond torch itself
(pytorch/pytorch#164502; torchtitan trains Llama 3 with it, pytorch/torchtitan#2000).

Where it runs: NVIDIA sm80+ in fp16/bf16 (torch's flash kernel; pytorch/tutorials#3660). CPU
builds have no kernel for it (`aten::_flash_attention_forward` is CUDA-only), and ROCm was left
out of torchtitan's varlen tests (pytorch/torchtitan#2085), so the planner offers it on NVIDIA
only. The module first shipped in torch 2.10 with `is_causal=` and without `scale=` or GQA;
later releases take `scale=`, `window_size=` and `enable_gqa=`. `varlen_call` adapts to the
signature it finds.

Calls that are not such a training row (generation with a KV cache, padded prompts) run as
`sdpa_varlen` runs them: one SDPA call with the causal and padding mask. Sequence boundaries
come from the batch's `cu_seq_lens_q`/`max_length_q` when the collator gives them
(transformers' FlashAttentionKwargs), else from `position_ids` (read once per row, not per
layer).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from finetune.hardware.arch import is_nvidia_sm80_plus
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import ModelFacts, Support, torch_at_least
from finetune.kernels.sdpa import FLASH_MAX_HEAD_DIM
from finetune.kernels.varlen_sdpa import _row_lengths, varlen_sdpa_attention

VARLEN_ATTN = "varlen_attn"
VARLEN_ATTN_TORCH = "2.10"  # the first torch with torch.nn.attention.varlen
# Archs whose flash kernel refuses training with head_dim in (192, 224] (sdp_utils.cpp).
_FLASH_NO_TRAINING_192_224 = ("sm_86", "sm_89", "sm_120", "sm_121")

VarlenFn = Callable[..., torch.Tensor]


def varlen_attn_support(profile: HardwareProfile, facts: ModelFacts) -> Support:
    """Whether torch's varlen attention can train on `profile` with `facts`, and why."""
    if not is_nvidia_sm80_plus(profile):
        return False, (
            "needs NVIDIA sm80+: torch's varlen_attn runs torch's CUDA flash kernel "
            "(pytorch/tutorials#3660); CPU builds have none, and ROCm is not covered yet "
            "(pytorch/torchtitan#2085)")
    if not torch_at_least(profile, VARLEN_ATTN_TORCH):
        return False, (
            f"needs torch {VARLEN_ATTN_TORCH}+ (torch.nn.attention.varlen, "
            f"pytorch/pytorch#164502); this is {profile.torch}")
    if facts.dtype == "fp32":
        return False, "needs fp16/bf16; the run's precision is fp32"
    head_dim = facts.head_dim or 0
    if head_dim > FLASH_MAX_HEAD_DIM:
        return False, f"supports head_dim <= {FLASH_MAX_HEAD_DIM}; the model has {head_dim}"
    if profile.arch in _FLASH_NO_TRAINING_192_224 and 192 < head_dim <= 224:
        return False, ("torch's flash kernel rejects training with head_dim in (192, 224] "
                       f"on {profile.arch}")
    return True, (
        f"torch's in-tree varlen attention (torch.nn.attention.varlen, its flash kernel) on "
        f"{profile.arch}: packed documents as cu_seqlens, no dense mask and no extra package "
        "(pytorch/pytorch#164502; used by torchtitan, pytorch/torchtitan#2000)")


def torch_varlen_attn() -> VarlenFn:
    """torch's `varlen_attn`; ImportError naming the torch it needs when this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise ImportError(
            f"torch {torch.__version__} has no torch.nn.attention.varlen (torch "
            f"{VARLEN_ATTN_TORCH}+): set kernels.attention=sdpa_varlen") from None
    return varlen_attn


@functools.lru_cache(maxsize=4)
def _parameters(fn: VarlenFn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def varlen_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq: torch.Tensor,
                max_len: int, scale: float | None, *, window: int | None = None,
                fn: VarlenFn | None = None) -> torch.Tensor:
    """Causal attention within each document of a flattened row.

    q (T, H, D), k and v (T, KV, D), `cu_seq` int32 (docs + 1,) offsets, `max_len` the longest
    document; returns (T, H, D). `window` is transformers' sliding_window (a query sees fewer
    than `window` positions back). `fn` is torch's varlen_attn by default. What the installed
    signature cannot express is done here (GQA: kv heads repeated) or refused (ValueError).
    """
    fn = fn or torch_varlen_attn()
    params = _parameters(fn)
    kwargs: dict[str, Any] = {}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)  # (-1, 0): causal
    elif window is not None:
        raise ValueError("this torch's varlen_attn takes no window_size, and the model uses a "
                         "sliding window: set kernels.attention=sdpa_varlen")
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-6):
        raise ValueError(f"this torch's varlen_attn takes no scale, and the model scales by "
                         f"{scale:g}, not 1/sqrt(head_dim): set kernels.attention=sdpa_varlen")
    return fn(q, k, v, cu_seq, cu_seq, max_len, max_len, **kwargs)


class _Offsets:
    """The int32 cu_seqlens of the last document lengths seen, on their device: every layer of
    one forward gets the same lengths (the same list from `_row_lengths`), so they are copied
    to the device once per forward, not once per layer."""

    def __init__(self) -> None:
        self._lengths: list[int] | None = None
        self._offsets: torch.Tensor | None = None

    def __call__(self, lengths: list[int], device: torch.device) -> torch.Tensor:
        if (self._lengths is lengths and self._offsets is not None
                and self._offsets.device == device):
            return self._offsets
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        self._lengths = lengths
        self._offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        return self._offsets


_offsets = _Offsets()


def _boundaries(kwargs: dict[str, Any], length: int,
                device: torch.device) -> tuple[torch.Tensor, int]:
    given = kwargs.get("cu_seq_lens_q")
    if given is not None and kwargs.get("max_length_q") is not None:
        return given.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    lengths = _row_lengths(kwargs.get("position_ids"), length) or [length]
    return _offsets(lengths, device), max(lengths)


def varlen_attn_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (b, h, s, d) in, (b, s, h, d) out."""
    q_len, k_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    training_row = (attention_mask is None and causal and q_len == k_len
                    and query.shape[0] == 1 and kwargs.get("softcap") is None
                    and kwargs.get("s_aux") is None)
    if not training_row:
        return varlen_sdpa_attention(module, query, key, value, attention_mask, dropout,
                                     scaling, is_causal, **kwargs)
    if dropout:
        raise ValueError(f"varlen_attn has no attention dropout (this model uses {dropout}): "
                         "set kernels.attention=sdpa_varlen")
    cu_seq, max_len = _boundaries(kwargs, q_len, query.device)
    out = varlen_call(query[0].transpose(0, 1), key[0].transpose(0, 1),
                      value[0].transpose(0, 1), cu_seq, max_len, scaling,
                      window=kwargs.get("sliding_window"))
    return out[None], None


def varlen_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """The self-check's forward: the rows of q/k/v (b, h, s, d) as the documents of one
    flattened row, through `varlen_call`; (b, h, s, d) out."""
    b, h, s, d = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (b, h, s, d) -> (b*s, h, d)
        return x.transpose(1, 2).reshape(b * s, x.shape[1], d)

    cu_seq = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    out = varlen_call(flat(q), flat(k), flat(v), cu_seq, s, scale)
    return out.reshape(b, s, h, d).transpose(1, 2)


def register_varlen_attn() -> None:
    """Make `attn_implementation="varlen_attn"` loadable by transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTN, varlen_attn_attention)
    AttentionMaskInterface.register(VARLEN_ATTN, flash_attention_mask)
