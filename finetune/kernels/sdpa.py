"""torch SDPA on each machine: which backend a training call takes, and how cuDNN is routed.

`F.scaled_dot_product_attention` picks flash, cuDNN, mem-efficient or MATH per call, from a
priority order, the arch, the dtype, head_dim and whether a mask is passed. The plan records
what it expects (`sdpa_backend` with no mask, `sdpa_backend_masked` with one) and how cuDNN
attention is routed (`cudnn_sdpa`, carried out by `finetune.kernels.apply`):

- "first": cuDNN attention first for calls without a mask (the `sdpa_cudnn` candidate);
- "unmasked_only": torch's own order for calls without a mask;
- None: torch's defaults, untouched (torch never picks cuDNN there).

With "first" and "unmasked_only", calls with a mask never take cuDNN: its backward returns NaN
grad_q when seq % 128 == 64 and a mask is passed (pytorch/pytorch#196678; any mask, an all-True
one too), which padded and packed batches hit. Sources: pytorch/pytorch
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (backend filters and priority, the
once-read TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL), intel/torch-xpu-ops#1749, #2232, #2390 (XPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from packaging.version import Version

from finetune.hardware.arch import (
    AMD_AOTRITON,
    AMD_AOTRITON_EXPERIMENTAL,
    NVIDIA_SM100,
    is_nvidia_sm80_plus,
    nvidia_family,
)
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import ModelFacts, torch_at_least

FLASH_MAX_HEAD_DIM = 256
AOTRITON_EXPERIMENTAL_ENV = "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"
CUDNN_FIRST = "first"
CUDNN_UNMASKED_ONLY = "unmasked_only"
# Archs where torch itself puts cuDNN attention first (cuDNN > 9.15, sdp_utils.cpp
# check_prefer_cudnn_attention), so masked calls must be kept off it explicitly.
TORCH_PREFERS_CUDNN: frozenset[str] = frozenset({"sm_90"}) | NVIDIA_SM100
# From torch 2.11, XPU runs unmasked SDPA with grad on a flash kernel (intel/torch-xpu-ops#2232).
XPU_SDPA_FLASH_TORCH = "2.11"
# F.scaled_dot_product_attention takes enable_gqa from torch 2.5 on.
_TORCH_SDPA_GQA = Version(torch.__version__.split("+")[0]).release >= (2, 5)


def cudnn_version(profile: HardwareProfile) -> tuple[int, int] | None:
    """(major, minor) of the profile's cuDNN, None when unknown."""
    if profile.cudnn is None:
        return None
    try:
        major, minor = (int(x) for x in profile.cudnn.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def cudnn_policy(profile: HardwareProfile, candidate: str) -> str | None:
    """How cuDNN attention is routed for an SDPA candidate (see the module docstring)."""
    if candidate == "sdpa_cudnn":
        return CUDNN_FIRST
    if candidate == "sdpa" and profile.vendor == "nvidia" and profile.arch in TORCH_PREFERS_CUDNN:
        return CUDNN_UNMASKED_ONLY
    return None


def sdpa_backend(profile: HardwareProfile, facts: ModelFacts, *, masked: bool,
                 cudnn: str | None = None) -> tuple[str, str]:
    """The SDPA backend torch takes for a causal training call, and why.

    `masked` is True when a 4D mask is passed (padding or packed documents): the flash kernels
    take no arbitrary mask, and the plan keeps such calls off cuDNN. `cudnn` is the plan's
    routing (`cudnn_policy`). Returns (flash | cudnn | efficient | math, explanation).
    """
    dtype, head_dim = facts.dtype, facts.head_dim or 0
    if profile.vendor == "cpu":
        return "flash", "torch's CPU flash kernel, which also takes masks and fp32"
    if profile.vendor == "apple":
        return "math", "MPS has no flash/efficient SDPA kernel; attention memory grows with seq_len^2"
    if profile.vendor == "intel":
        return _xpu_backend(profile, masked)
    if profile.vendor == "amd":
        return _amd_backend(profile, dtype, head_dim, masked)
    if not is_nvidia_sm80_plus(profile):
        if dtype == "bf16":
            return "math", f"the efficient kernel needs sm80+ for bf16; this is {profile.arch}"
        return "efficient", f"flash needs sm80+; {profile.arch} takes the mem-efficient kernel"
    if masked:
        kept_off = " and the plan keeps masked calls off cuDNN (pytorch/pytorch#196678)"
        return "efficient", "flash takes no arbitrary mask" + (kept_off if cudnn else "")
    if dtype == "fp32" or head_dim > FLASH_MAX_HEAD_DIM:
        return "efficient", "flash takes no fp32 or head_dim > 256"
    if cudnn == CUDNN_FIRST:
        return "cudnn", "cuDNN attention put first by this plan for calls without a mask"
    if profile.arch in ("sm_86", "sm_89", "sm_120", "sm_121") and 192 < head_dim <= 224:
        return "efficient", f"flash rejects training with head_dim in (192, 224] on {profile.arch}"
    if profile.arch in TORCH_PREFERS_CUDNN:
        return _nvidia_cudnn_or_flash(profile)
    return "flash", f"SDPA flash on {nvidia_family(profile)}"


def _xpu_backend(profile: HardwareProfile, masked: bool) -> tuple[str, str]:
    if not torch_at_least(profile, XPU_SDPA_FLASH_TORCH):
        return "math", (
            "XPU's fused SDPA (oneDNN) has no backward before torch 2.11, so training runs the "
            "math path (intel/torch-xpu-ops#1749)"
        )
    if masked:
        return "math", "masked SDPA calls fall to MATH on XPU (intel/torch-xpu-ops#2390)"
    return "flash", (
        "from torch 2.11 unmasked SDPA with grad runs a flash kernel on XPU "
        "(intel/torch-xpu-ops#2232)"
    )


def _amd_backend(profile: HardwareProfile, dtype: str | None, head_dim: int,
                 masked: bool) -> tuple[str, str]:
    if profile.arch not in AMD_AOTRITON:
        return "math", f"AOTriton has no kernels for {profile.arch}; memory grows with seq_len^2"
    limit = 256 if profile.arch.startswith("gfx11") else 512
    if head_dim > limit:
        return "math", f"AOTriton supports head_dim <= {limit} on {profile.arch}"
    flag = (
        f" (experimental in some AOTriton versions: needs {AOTRITON_EXPERIMENTAL_ENV}=1, which "
        "this plan sets)"
        if profile.arch in AMD_AOTRITON_EXPERIMENTAL
        else ""
    )
    if masked or dtype == "fp32":
        return "efficient", f"AOTriton mem-efficient{flag}"
    return "flash", f"AOTriton flash{flag}"


def _nvidia_cudnn_or_flash(profile: HardwareProfile) -> tuple[str, str]:
    # torch puts cuDNN attention first on sm90/sm100/sm103 once cuDNN is newer than 9.15.
    version = cudnn_version(profile)
    if version is None:
        return "flash", f"SDPA flash (torch prefers cuDNN on {profile.arch} when cuDNN > 9.15)"
    if version > (9, 15):
        return "cudnn", f"cuDNN {profile.cudnn} > 9.15 is prioritised by torch on {profile.arch}"
    return "flash", f"cuDNN {profile.cudnn} <= 9.15, so SDPA flash leads on {profile.arch}"


def cudnn_head_dim_limit(profile: HardwareProfile) -> int:
    """The largest head_dim torch sends to cuDNN attention: 256 on sm_90/sm_100/sm_103 with
    cuDNN > 9.22, else 128 (sdp_utils.cpp check_cudnn_tensor_shapes)."""
    version = cudnn_version(profile)
    if profile.arch in TORCH_PREFERS_CUDNN and version is not None and version > (9, 22):
        return 256
    return 128


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_h, s, d) -> (b, kv_h * groups, s, d), each kv head repeated for its q heads."""
    if groups == 1:
        return x
    b, kv_h, s, d = x.shape
    return x[:, :, None].expand(b, kv_h, groups, s, d).reshape(b, kv_h * groups, s, d)


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, *,
                 mask: torch.Tensor | None = None, causal: bool = True,
                 dropout: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention as transformers calls it (GQA native on torch 2.5+,
    repeated kv heads before); causal without a mask unless told otherwise."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _TORCH_SDPA_GQA:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    extra = {"enable_gqa": True} if groups > 1 and _TORCH_SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale, dropout_p=dropout, **extra)


def cudnn_sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """`sdpa_forward` restricted to cuDNN attention: raises where cuDNN cannot run the call, so
    the self-check proves the kernel the plan routes to, not a fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return sdpa_forward(q, k, v, scale)
