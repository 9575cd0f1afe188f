"""Attention family: which `attn_implementation` transformers should load, and why.

Candidates are ranked per architecture family and per packing mode (lower is preferred):

| family | whole rows (packing off) | packed rows |
|---|---|---|
| sm_90 | FA3, sdpa_cudnn, FA4, FA2, sdpa, flex, eager | FA3, FA4, FA2, varlen_attn, flex, sdpa_varlen, sdpa, eager |
| sm_100/103 | sdpa_cudnn, FA4, FA2, sdpa, flex, eager | FA4, FA2, varlen_attn, flex, sdpa_varlen, sdpa, eager |
| sm_120/121, sm80 | FA2, sdpa, sdpa_cudnn, flex, eager | FA2, varlen_attn, flex, sdpa_varlen, sdpa, eager |
| AMD | FA2 (CK, or Triton on RDNA), sdpa, flex, eager | FA2, flex, sdpa_varlen, sdpa, eager |
| Intel XPU | sdpa, flex, eager | flex, sdpa_varlen, sdpa, eager |
| CPU | sdpa_varlen, sdpa, eager | the same |

Why: cuDNN SDPA is 1.7-2.3x faster than SDPA-flash for Hopper training shapes, slower on
Ampere (0.82x A100) and sm_120 (0.88x), a wash on Ada (huggingface/transformers#48163); on
sm_100 FA2 reaches only ~300-380 fwd TFLOP/s (Dao-AILab/flash-attention#1589, #2605) and cuDNN
9.19 beat FA4 by 1.24-1.98x and FA2 varlen by ~2.9x (sgl-project/sglang#33655). Packed rows
need a path that keeps documents apart (varlen flash, a block-diagonal mask, a flex BlockMask).
On the sdpa path they carry a dense [T, T] mask: flash and cuDNN take no such mask, so every
pair of the row is computed on the efficient kernel and then masked (about 8x the useful work
for 8 documents a row), and cuDNN must not take it anyway (pytorch/pytorch#196678), so
`sdpa_cudnn` is refused with packing. Packed rows therefore rank every path without a dense
mask first: varlen flash packages, torch's in-tree `varlen_attn` (finetune.kernels.varlen_torch,
pytorch/pytorch#164502), flex with a document BlockMask, then `sdpa_varlen`; the dense-mask
paths (sdpa, eager) come last. On XPU masked SDPA falls to MATH (intel/torch-xpu-ops#2390). Each candidate carries the forward its
self-check runs: the function transformers uses for that implementation. Other sources:
Dao-AILab/flash-attention README and setup.py (FA2/FA3/FA4 hardware, ROCm CK targets), v2.8.3
flash_attn_interface.py (FLASH_ATTENTION_TRITON_AMD_ENABLE), unslothai/unsloth#8821 (silent
MATH fallback on ROCm), axolotl's FA4 gate (head_dim <= 128), huggingface/transformers#42435
(`flash_attention_4`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from finetune.hardware.arch import (
    AMD_BF16_NATIVE,
    AMD_FLASH_ATTN_CK,
    AMD_RDNA,
    NVIDIA_SM100,
    is_amd,
    is_nvidia_sm80_plus,
    rank_family,
)
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import (
    Candidate,
    ModelFacts,
    Registry,
    Support,
    runtime_at_least,
    torch_at_least,
    version_at_least,
)
from finetune.kernels.sdpa import (
    AOTRITON_EXPERIMENTAL_ENV,
    FLASH_MAX_HEAD_DIM,
    TORCH_PREFERS_CUDNN,
    cudnn_head_dim_limit,
    cudnn_policy,
    cudnn_sdpa_forward,
    cudnn_version,
    repeat_kv,
    sdpa_backend,
    sdpa_forward,
)
from finetune.kernels.varlen_sdpa import VARLEN_SDPA, varlen_sdpa_attention
from finetune.kernels.varlen_torch import VARLEN_ATTN, varlen_attn_forward, varlen_attn_support

# q (b, h, s, d), k and v (b, kv_h, s, d) -> causal attention output (b, h, s, d).
AttentionForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

FA2_NEEDS = (
    "needs NVIDIA sm80+ (Ampere or newer) or AMD gfx90a/gfx942/gfx950/gfx110x/gfx1151/gfx120x "
    "(flash-attn CK or Triton backend)"
)
FLASH_ATTENTION_TRITON_AMD_ENV = "FLASH_ATTENTION_TRITON_AMD_ENABLE"
FA4_MAX_HEAD_DIM = 128
FA4_TRANSFORMERS = "5.0"  # the first transformers with attn_implementation="flash_attention_4"
SDPA_CUDNN_TORCH = "2.6"  # sdpa_kernel(..., set_priority=True), pytorch/pytorch#140467
PACKED_MASK_NAN = (
    "packed rows carry a 4D mask on the SDPA path and cuDNN's masked backward returns NaN "
    "grad_q when seq % 128 == 64 (pytorch/pytorch#196678), so masked calls are kept off cuDNN: "
    "packed rows take a path without a dense mask (varlen_attn, flex_attention, sdpa_varlen)"
)
CUDNN_AVOID_RECOMPILE_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


@dataclass(frozen=True)
class AttentionCandidate(Candidate):
    """An attention implementation.

    Attributes:
        forward: the causal GQA forward the self-check runs (None: cannot be self-checked).
        packing_isolation: how packed documents are kept apart with this implementation:
            "varlen" (cu_seqlens), "block_mask_4d" (block-diagonal 4D mask), "flex_block_mask"
            (flex BlockMask); None when it is not used for packed rows.
        attn_implementation: the value transformers takes for it; None means `name`.
    """

    forward: AttentionForward | None = None
    packing_isolation: str | None = None
    attn_implementation: str | None = None

    @property
    def transformers_name(self) -> str:
        """The `attn_implementation` to load the model with."""
        return self.attn_implementation or self.name


def _first_failure(*checks: Support) -> Support | None:
    for ok, reason in checks:
        if not ok:
            return ok, reason
    return None


def _half_precision(facts: ModelFacts) -> Support:
    if facts.dtype == "fp32":
        return False, "needs fp16/bf16; the run's precision is fp32"
    return True, ""


def _head_dim(facts: ModelFacts, limit: int) -> Support:
    if facts.head_dim is not None and facts.head_dim > limit:
        return False, f"supports head_dim <= {limit}; the model has {facts.head_dim}"
    return True, ""


def _fa3(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor != "nvidia" or profile.compute_capability != (9, 0):
        return False, "needs NVIDIA Hopper (sm_90)"
    if not runtime_at_least(profile, "cuda", "12.3"):
        return False, f"needs CUDA 12.3+; this is {profile.runtime}"
    if not profile.has_package("flash-attn-3"):
        return False, "needs the flash-attn-3 package (FlashAttention 3, flash-attention/hopper)"
    failed = _first_failure(_half_precision(facts), _head_dim(facts, FLASH_MAX_HEAD_DIM))
    return failed or (True, "FlashAttention 3 on Hopper (sm_90), varlen packing")


def _fa4(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if not (profile.arch == "sm_90" or profile.arch in NVIDIA_SM100):
        return False, "needs NVIDIA Hopper or datacenter Blackwell (sm_90, sm_100, sm_103)"
    if not profile.has_package("flash-attn-4"):
        return False, "needs the flash-attn-4 package (FlashAttention 4, flash_attn.cute)"
    if not version_at_least(profile.transformers, FA4_TRANSFORMERS):
        return False, (
            f"needs transformers {FA4_TRANSFORMERS}+ for attn_implementation=flash_attention_4; "
            f"this is {profile.transformers or 'unknown'}"
        )
    failed = _first_failure(_half_precision(facts), _head_dim(facts, FA4_MAX_HEAD_DIM))
    return failed or (True, f"FlashAttention 4 (CuTeDSL) on {profile.arch}, varlen packing")


def flash_attn_triton(profile: HardwareProfile) -> bool:
    """True when flash-attn runs its Triton backend here: on AMD RDNA always (no released
    flash-attn has a CK backend for RDNA; flash-attention v2.8.3), and on AMD wherever the
    installed build has no compiled extension."""
    return profile.vendor == "amd" and (
        profile.arch in AMD_RDNA or profile.flash_attn_build == "triton"
    )


def _fa2(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if not (is_nvidia_sm80_plus(profile) or is_amd(profile, AMD_FLASH_ATTN_CK)):
        return False, FA2_NEEDS
    if not profile.has_package("flash-attn"):
        return False, "needs the flash-attn package (pip install flash-attn)"
    failed = _first_failure(_half_precision(facts), _head_dim(facts, FLASH_MAX_HEAD_DIM))
    if failed:
        return failed
    if flash_attn_triton(profile):
        return True, (
            f"FlashAttention 2 (Triton backend, {FLASH_ATTENTION_TRITON_AMD_ENV}=TRUE set by "
            f"this plan) on {profile.arch}, varlen packing"
        )
    if profile.vendor == "amd":
        return True, f"FlashAttention 2 (CK backend) on {profile.arch}, varlen packing"
    slow = (
        " (reaches only ~300-380 fwd TFLOP/s on sm_100: Dao-AILab/flash-attention#1589)"
        if profile.arch in NVIDIA_SM100 else ""
    )
    return True, f"FlashAttention 2 (CUDA) on {profile.arch}, varlen packing{slow}"


def _sdpa(profile: HardwareProfile, facts: ModelFacts) -> Support:
    # Packed rows reach SDPA with their block-diagonal mask, so the masked backend is what runs.
    backend, why = sdpa_backend(profile, facts, masked=facts.packing,
                                cudnn=cudnn_policy(profile, "sdpa"))
    rows = (", packed rows with a dense block-diagonal [T, T] mask (every pair of the row "
            "computed, then masked)" if facts.packing else "")
    if backend == "math":
        return True, f"torch SDPA{rows}, backend MATH - no fused kernel: {why}"
    return True, f"torch SDPA{rows}, backend {backend}: {why}"


_CUDNN_RANK_WHY = {
    "nvidia_hopper": "1.7-2.3x faster than SDPA flash for Hopper training shapes "
                     "(huggingface/transformers#48163)",
    "nvidia_sm100": "ahead of FA2 (~300-380 fwd TFLOP/s on sm_100, Dao-AILab/flash-attention#1589)"
                    " and FA4 (cuDNN 9.19 1.24-1.98x faster on B200, sgl-project/sglang#33655)",
    "nvidia_sm120": "0.88x of SDPA flash on sm_120 (huggingface/transformers#48163), so ranked "
                    "below sdpa",
}
_CUDNN_DEFAULT_WHY = ("0.82x of SDPA flash on A100 and a wash on Ada "
                      "(huggingface/transformers#48163), so ranked below sdpa")


def _sdpa_cudnn(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if not is_nvidia_sm80_plus(profile):
        return False, "needs NVIDIA sm80+ (torch's cuDNN attention runs on sm80-sm121 only)"
    if not torch_at_least(profile, SDPA_CUDNN_TORCH):
        return False, (
            f"needs torch {SDPA_CUDNN_TORCH}+ (SDPA backend priority); this is {profile.torch}"
        )
    version = cudnn_version(profile)
    if version is None or version < (9, 0):
        return False, (
            f"needs cuDNN 9+ (torch's cuDNN attention); this is {profile.cudnn or 'unknown'}"
        )
    if facts.packing:
        return False, PACKED_MASK_NAN
    limit = cudnn_head_dim_limit(profile)
    failed = _first_failure(_half_precision(facts), _head_dim(facts, limit))
    if failed:
        return failed
    if facts.head_dim is not None and facts.head_dim % 8:
        return False, f"needs head_dim divisible by 8; the model has {facts.head_dim}"
    why = _CUDNN_RANK_WHY.get(rank_family(profile), _CUDNN_DEFAULT_WHY)
    return True, (
        f"torch SDPA with cuDNN attention first for calls without a mask (masked calls skip "
        f"cuDNN, pytorch/pytorch#196678): {why}"
    )


def _sdpa_varlen(profile: HardwareProfile, facts: ModelFacts) -> Support:
    backend = sdpa_backend(profile, facts, masked=False)[0]
    return True, (
        f"torch SDPA once per document of padding-free rows (is_causal, no mask; backend "
        f"{backend}): nothing computed on padding or across documents"
    )


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """`sdpa_varlen` as a training batch reaches it: the rows of q/k/v flattened into one row
    of documents (position_ids restart at 0 for each), split back into rows afterwards."""
    b, _, s, _ = q.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (b, h, s, d) -> (1, h, b*s, d)
        return x.transpose(0, 1).reshape(1, x.shape[1], b * s, x.shape[3])

    positions = torch.arange(s, device=q.device).repeat(b)[None]
    module = _ProbeAttention(VARLEN_SDPA, q.shape[1] // k.shape[1])
    out, _ = varlen_sdpa_attention(module, flat(q), flat(k), flat(v), None, scaling=scale,
                                   position_ids=positions)
    return out.reshape(b, s, q.shape[1], q.shape[3]).transpose(1, 2)  # (b, h, s, d)


def _flex(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if not torch_at_least(profile, "2.5"):
        return False, f"needs torch 2.5+; this is {profile.torch}"
    if profile.vendor in ("cpu", "apple"):
        return False, f"has no backward on {profile.arch} (forward only), so it cannot train here"
    if profile.vendor == "intel" and not torch_at_least(profile, "2.9"):
        return False, f"needs torch 2.9+ on XPU; this is {profile.torch}"
    if profile.vendor == "nvidia" and not is_nvidia_sm80_plus(profile):
        return False, f"needs NVIDIA sm80+ (Triton's supported range); this is {profile.arch}"
    if profile.vendor == "amd" and profile.arch not in AMD_BF16_NATIVE:
        return False, f"needs AMD gfx90a or newer for Triton; this is {profile.arch}"
    if not profile.has_package("triton"):
        return False, ("needs triton (flex_attention is compiled to a Triton kernel; GPU builds "
                       "of torch ship it as pytorch-triton)")
    xpu_packed = (" (on XPU masked SDPA falls to MATH, intel/torch-xpu-ops#2390)"
                  if profile.vendor == "intel" and facts.packing else "")
    return True, (f"FlexAttention compiled with Triton, packed documents as a document BlockMask "
                  f"(only blocks inside a document are computed){xpu_packed}")


def _eager(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "matmul + softmax reference path; memory grows with seq_len^2"


def eager_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """transformers' eager attention: softmax in fp32, cast back to the run dtype."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = q.shape[-2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class _ProbeAttention(torch.nn.Module):
    """The attributes transformers' attention functions read from an attention module."""

    def __init__(self, implementation: str, groups: int) -> None:
        super().__init__()
        self.is_causal = True
        self.layer_idx = 0
        self.num_key_value_groups = groups
        self.config = SimpleNamespace(_attn_implementation=implementation)


def _transformers_flash_forward(implementation: str) -> AttentionForward:
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from transformers.integrations.flash_attention import flash_attention_forward

        module = _ProbeAttention(implementation, q.shape[1] // k.shape[1])
        out, _ = flash_attention_forward(module, q, k, v, None, scaling=scale, is_causal=True)
        return out.transpose(1, 2)  # transformers returns (b, s, h, d)

    return forward


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch flex_attention with a causal BlockMask; compiled off CPU, as transformers does."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = q.shape[-2]
    block_mask = create_block_mask(
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, s, s, device=q.device
    )
    fn: Any = flex_attention if q.device.type == "cpu" else torch.compile(flex_attention)
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


ATTENTION: Registry[AttentionCandidate] = Registry(
    "attention",
    [
        AttentionCandidate("flash_attention_3", _fa3, default_rank=10,
                           forward=_transformers_flash_forward("flash_attention_3"),
                           packing_isolation="varlen"),
        AttentionCandidate("sdpa_cudnn", _sdpa_cudnn, default_rank=50,
                           ranks={"nvidia_hopper": 15, "nvidia_sm100": 5},
                           forward=cudnn_sdpa_forward, attn_implementation="sdpa"),
        AttentionCandidate("flash_attention_4", _fa4, default_rank=20,
                           forward=_transformers_flash_forward("flash_attention_4"),
                           packing_isolation="varlen"),
        AttentionCandidate("flash_attention_2", _fa2, default_rank=30,
                           forward=_transformers_flash_forward("flash_attention_2"),
                           packing_isolation="varlen"),
        # Packed rows: the dense-mask paths (sdpa, eager) rank below every path without one.
        AttentionCandidate("sdpa", _sdpa, default_rank=40, packed_rank=80, forward=sdpa_forward,
                           packing_isolation="block_mask_4d"),
        AttentionCandidate(VARLEN_ATTN, varlen_attn_support, default_rank=48, packed_rank=35,
                           forward=varlen_attn_forward, packing_isolation="varlen"),
        # Measured ahead of sdpa on CPU only (finetune.kernels.varlen_sdpa); for whole rows
        # elsewhere by name.
        AttentionCandidate(VARLEN_SDPA, _sdpa_varlen, default_rank=45, ranks={"cpu": 35},
                           forward=varlen_forward, packing_isolation="varlen"),
        AttentionCandidate("flex_attention", _flex, default_rank=60, packed_rank=38,
                           forward=flex_forward, packing_isolation="flex_block_mask"),
        AttentionCandidate("eager", _eager, default_rank=70, packed_rank=90, forward=eager_forward,
                           packing_isolation="block_mask_4d"),
    ],
)


def packing_isolation(
    attention_name: str, registry: Registry[AttentionCandidate] | None = None
) -> str | None:
    """How packed documents are isolated with this attention: varlen | block_mask_4d |
    flex_block_mask, or None when it is not used for packed rows (packing must then be off)."""
    registry = registry or ATTENTION
    if attention_name not in registry:
        return None
    return registry.get(attention_name).packing_isolation


def supports_packing(
    attention_name: str, registry: Registry[AttentionCandidate] | None = None
) -> bool:
    """True when packed documents can be kept from attending to each other."""
    return packing_isolation(attention_name, registry) is not None


def attention_details(
    profile: HardwareProfile, candidate: AttentionCandidate, facts: ModelFacts
) -> dict[str, Any]:
    """Fields recorded next to the attention choice (selfcheck is added by the planner)."""
    details: dict[str, Any] = {
        "attn_implementation": candidate.transformers_name,
        "packing": facts.packing,
        "packing_isolation": candidate.packing_isolation,
    }
    if candidate.transformers_name in ("sdpa", VARLEN_SDPA):
        cudnn = cudnn_policy(profile, candidate.name)
        details["sdpa_backend"] = sdpa_backend(profile, facts, masked=False, cudnn=cudnn)[0]
        details["sdpa_backend_masked"] = sdpa_backend(profile, facts, masked=True, cudnn=cudnn)[0]
        details["cudnn_sdpa"] = cudnn
    return details


def attention_env(profile: HardwareProfile) -> dict[str, tuple[str, str]]:
    """Environment the attention paths need: name -> (value, reason).

    Depends on the profile only, not on the choice, because it must be in place before the
    self-checks try the candidates.
    """
    env: dict[str, tuple[str, str]] = {}
    if profile.vendor == "amd":
        env[AOTRITON_EXPERIMENTAL_ENV] = (
            "1",
            "torch reads it once, at the first SDPA call, and refuses AOTriton on archs its "
            "AOTriton version calls experimental (the set differs between versions), falling "
            "back to MATH silently (unslothai/unsloth#8821, pytorch/pytorch#134498)",
        )
    if profile.vendor == "nvidia" and profile.arch in TORCH_PREFERS_CUDNN:
        env[CUDNN_AVOID_RECOMPILE_ENV] = (
            "1",
            "cuDNN attention builds an execution graph per new (batch, seq) shape, and packed or "
            f"padded batches change shape every step; torch prefers cuDNN on {profile.arch} "
            "(pytorch/pytorch#155958)",
        )
    if flash_attn_triton(profile) and profile.has_package("flash-attn"):
        env[FLASH_ATTENTION_TRITON_AMD_ENV] = (
            "TRUE",
            f"flash-attn runs its Triton backend on {profile.arch}, which it reads from this "
            "variable when first imported (flash-attention v2.8.3 flash_attn_interface.py)",
        )
    return env


def default_scale(head_dim: int) -> float:
    """The softmax scale every implementation uses: 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)

