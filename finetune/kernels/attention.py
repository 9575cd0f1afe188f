"""Attention family: which `attn_implementation` transformers should load, and why.

Candidates, best first: flash_attention_3 (Hopper only), flash_attention_2 (NVIDIA sm80+, AMD
CK targets), sdpa (torch; the backend it takes is recorded), flex_attention (needs a backward,
so never on CPU/MPS for training), eager. Each candidate also carries the forward the
self-check runs: the same function transformers uses for that implementation.
Sources: Dao-AILab/flash-attention README (FA2/FA3 hardware, ROCm CK targets), pytorch/pytorch
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (SDPA backend order), unslothai/unsloth#8821
(silent MATH fallback on experimental ROCm archs), intel/torch-xpu-ops#1749 (XPU SDPA backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from packaging.version import Version

from finetune.hardware.arch import (
    AMD_AOTRITON,
    AMD_AOTRITON_EXPERIMENTAL,
    AMD_BF16_NATIVE,
    AMD_FLASH_ATTN_CK,
    is_amd,
    is_nvidia_sm80_plus,
    nvidia_family,
)
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import (
    Candidate,
    ModelFacts,
    Registry,
    Support,
    runtime_at_least,
    torch_at_least,
)

# q (b, h, s, d), k and v (b, kv_h, s, d) -> causal attention output (b, h, s, d).
AttentionForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

FLASH_MAX_HEAD_DIM = 256
FA2_NEEDS = (
    "needs NVIDIA sm80+ (Ampere or newer) or AMD gfx90a/gfx942/gfx950/gfx110x/gfx1151/gfx120x "
    "(flash-attn CK backend)"
)
AOTRITON_EXPERIMENTAL_ENV = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"
# F.scaled_dot_product_attention takes enable_gqa from torch 2.5 on.
_TORCH_SDPA_GQA = Version(torch.__version__.split("+")[0]).release >= (2, 5)


@dataclass(frozen=True)
class AttentionCandidate(Candidate):
    """An attention implementation.

    Attributes:
        forward: the causal GQA forward the self-check runs (None: cannot be self-checked).
        packing_isolation: how packed documents are kept apart with this implementation:
            "varlen" (cu_seqlens), "block_mask_4d" (block-diagonal 4D mask), "flex_block_mask"
            (flex BlockMask); None when packing cannot be isolated.
    """

    forward: AttentionForward | None = None
    packing_isolation: str | None = None


def _half_precision(facts: ModelFacts) -> Support:
    if facts.dtype == "fp32":
        return False, "needs fp16/bf16; the run's precision is fp32"
    return True, ""


def _head_dim(facts: ModelFacts, limit: int) -> Support:
    if facts.head_dim is not None and facts.head_dim > limit:
        return False, f"supports head_dim <= {limit}; the model has {facts.head_dim}"
    return True, ""


def _first_failure(*checks: Support) -> Support | None:
    for ok, reason in checks:
        if not ok:
            return ok, reason
    return None


def _fa3(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if profile.vendor != "nvidia" or profile.compute_capability != (9, 0):
        return False, "needs NVIDIA Hopper (sm_90)"
    if not runtime_at_least(profile, "cuda", "12.3"):
        return False, f"needs CUDA 12.3+; this is {profile.runtime}"
    if not profile.has_package("flash_attn_interface"):
        return False, (
            "needs the flash_attn_interface package (FlashAttention 3, built from "
            "flash-attention/hopper)"
        )
    failed = _first_failure(_half_precision(facts), _head_dim(facts, FLASH_MAX_HEAD_DIM))
    return failed or (True, "FlashAttention 3 on Hopper (sm_90)")


def _fa2(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if not (is_nvidia_sm80_plus(profile) or is_amd(profile, AMD_FLASH_ATTN_CK)):
        return False, FA2_NEEDS
    if not profile.has_package("flash_attn"):
        return False, "needs the flash_attn package (pip install flash-attn)"
    failed = _first_failure(_half_precision(facts), _head_dim(facts, FLASH_MAX_HEAD_DIM))
    backend = "CK backend" if profile.vendor == "amd" else "CUDA"
    return failed or (True, f"FlashAttention 2 ({backend}) on {profile.arch}, varlen packing")


def sdpa_backend(profile: HardwareProfile, facts: ModelFacts, *, masked: bool) -> tuple[str, str]:
    """The SDPA backend torch takes for a causal training call, and why.

    `masked` is True when a 4D mask is passed (padding or packed documents): the flash and
    cuDNN kernels take no arbitrary mask, so such calls go to `efficient` at best.
    Returns (flash | cudnn | efficient | math, explanation).
    """
    dtype, head_dim = facts.dtype, facts.head_dim or 0
    if profile.vendor == "cpu":
        return "flash", "torch's CPU flash kernel, which also takes masks and fp32"
    if profile.vendor == "apple":
        return "math", "MPS has no flash/efficient SDPA kernel; attention memory grows with seq_len^2"
    if profile.vendor == "intel":
        return "math", (
            "XPU's fused SDPA (oneDNN) has no backward in these torch versions, so training "
            "runs the math path (intel/torch-xpu-ops#1749)"
        )
    if profile.vendor == "amd":
        if profile.arch not in AMD_AOTRITON:
            return "math", f"AOTriton has no kernels for {profile.arch}; memory grows with seq_len^2"
        limit = 256 if profile.arch.startswith("gfx11") else 512
        if head_dim > limit:
            return "math", f"AOTriton supports head_dim <= {limit} on {profile.arch}"
        flag = (
            f" (experimental arch: needs {AOTRITON_EXPERIMENTAL_ENV}=1, set by this plan)"
            if profile.arch in AMD_AOTRITON_EXPERIMENTAL
            else ""
        )
        if masked or dtype == "fp32":
            return "efficient", f"AOTriton mem-efficient{flag}"
        return "flash", f"AOTriton flash{flag}"
    family = nvidia_family(profile)
    if not is_nvidia_sm80_plus(profile):
        if dtype == "bf16":
            return "math", f"the efficient kernel needs sm80+ for bf16; this is {profile.arch}"
        return "efficient", f"flash needs sm80+; {profile.arch} takes the mem-efficient kernel"
    if masked or dtype == "fp32" or head_dim > FLASH_MAX_HEAD_DIM:
        return "efficient", "flash takes no arbitrary mask, fp32 or head_dim > 256"
    if profile.arch in ("sm_86", "sm_89", "sm_120", "sm_121") and 192 < head_dim <= 224:
        return "efficient", f"flash rejects training with head_dim in (192, 224] on {profile.arch}"
    if profile.arch in ("sm_90", "sm_100", "sm_103"):
        return _nvidia_cudnn_or_flash(profile)
    return "flash", f"SDPA flash on {family}"


def _nvidia_cudnn_or_flash(profile: HardwareProfile) -> tuple[str, str]:
    # torch puts cuDNN attention first on sm90/sm100/sm103 once cuDNN is newer than 9.15.
    if profile.cudnn is not None:
        major, minor = (int(x) for x in profile.cudnn.split(".")[:2])
        if (major, minor) > (9, 15):
            return "cudnn", f"cuDNN {profile.cudnn} > 9.15 is prioritised on {profile.arch}"
        return "flash", f"cuDNN {profile.cudnn} <= 9.15, so SDPA flash leads on {profile.arch}"
    return "flash", f"SDPA flash (torch prefers cuDNN on {profile.arch} when cuDNN > 9.15)"


def _sdpa(profile: HardwareProfile, facts: ModelFacts) -> Support:
    backend, why = sdpa_backend(profile, facts, masked=False)
    if backend == "math":
        return True, f"torch SDPA, backend MATH - no fused kernel: {why}"
    return True, f"torch SDPA, backend {backend}: {why}"


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
        return False, "needs triton (flex_attention is compiled to a Triton kernel)"
    return True, "FlexAttention compiled with Triton, BlockMask packing"


def _eager(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "matmul + softmax reference path; memory grows with seq_len^2"


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_h, s, d) -> (b, kv_h * groups, s, d), each kv head repeated for its q heads."""
    if groups == 1:
        return x
    b, kv_h, s, d = x.shape
    return x[:, :, None].expand(b, kv_h, groups, s, d).reshape(b, kv_h * groups, s, d)


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


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention as transformers calls it without a mask (GQA native on
    torch 2.5+, repeated kv heads before)."""
    if _TORCH_SDPA_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True, scale=scale
    )


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
        AttentionCandidate("flash_attention_3", _fa3, default_rank=0,
                           forward=_transformers_flash_forward("flash_attention_3"),
                           packing_isolation="varlen"),
        AttentionCandidate("flash_attention_2", _fa2, default_rank=1,
                           forward=_transformers_flash_forward("flash_attention_2"),
                           packing_isolation="varlen"),
        AttentionCandidate("sdpa", _sdpa, default_rank=2, forward=sdpa_forward,
                           packing_isolation="block_mask_4d"),
        AttentionCandidate("flex_attention", _flex, default_rank=3, forward=flex_forward,
                           packing_isolation="flex_block_mask"),
        AttentionCandidate("eager", _eager, default_rank=4, forward=eager_forward,
                           packing_isolation="block_mask_4d"),
    ],
)


def packing_isolation(
    attention_name: str, registry: Registry[AttentionCandidate] | None = None
) -> str | None:
    """How packed documents are isolated with this attention: varlen | block_mask_4d |
    flex_block_mask, or None when it cannot isolate them (packing must then be off)."""
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
        "packing": candidate.packing_isolation is not None,
        "packing_isolation": candidate.packing_isolation,
    }
    if candidate.name == "sdpa":
        details["sdpa_backend"] = sdpa_backend(profile, facts, masked=False)[0]
        details["sdpa_backend_masked"] = sdpa_backend(profile, facts, masked=True)[0]
    return details


def attention_env(profile: HardwareProfile) -> dict[str, tuple[str, str]]:
    """Environment the attention path needs: name -> (value, reason)."""
    if is_amd(profile, AMD_AOTRITON_EXPERIMENTAL):
        return {
            AOTRITON_EXPERIMENTAL_ENV: (
                "1",
                f"AOTriton is experimental on {profile.arch}; without it SDPA silently "
                "falls back to MATH (quadratic memory)",
            )
        }
    return {}


def default_scale(head_dim: int) -> float:
    """The softmax scale every implementation uses: 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)
