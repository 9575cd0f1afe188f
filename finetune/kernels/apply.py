"""Carry out a kernel plan on this process: environment variables, torch globals, model patches.

The planner only decides; everything here changes process state. Order matters:

1. `apply_env_vars(plan.env)` before the first SDPA call or flash-attn import of the process.
   `plan()` does it itself before its self-checks (torch reads
   TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL once, at the first SDPA call).
2. `apply_env(plan)` once the plan is final: the variables again (a no-op when unchanged), TF32,
   and the SDPA routing of cuDNN attention (`plan.cudnn_sdpa`), before the model is built.
3. `apply_fused_ops(model, plan.fused_ops)` and `apply_loss_head(model, plan.loss_head)` on the
   loaded model, before adapters are attached.
4. `apply_lora_kernel(model, plan.lora)` once the adapters are attached, before the model is
   wrapped or sharded.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from finetune.hardware.arch import AMD_TF32_EMULATED, is_amd
from finetune.kernels.chunked_loss import install_chunked_head
from finetune.kernels.fused_ops import LIGER_OPS
from finetune.kernels.kernel_plan import KernelPlan
from finetune.kernels.lora import LORA
from finetune.kernels.lora_linear import fuse_lora_layers
from finetune.kernels.sdpa import CUDNN_FIRST, CUDNN_UNMASKED_ONLY

logger = logging.getLogger(__name__)


def apply_env_vars(env: Mapping[str, str]) -> dict[str, str]:
    """Put `env` into os.environ; returns the variables this call set.

    A variable the user already set to another value is kept (explicit beats automatic) and
    logged.
    """
    applied: dict[str, str] = {}
    for name, value in env.items():
        current = os.environ.get(name)
        if current is not None and current != value:
            logger.warning(
                "env: keeping %s=%s from the environment (the plan would set %s)",
                name, current, value,
            )
            continue
        os.environ[name] = value
        applied[name] = value
    return applied


def apply_env(plan: KernelPlan) -> dict[str, str]:
    """Apply the plan's process state: its environment variables (`apply_env_vars`), TF32 for
    fp32 matmuls, and the routing of cuDNN attention for SDPA (`route_sdpa`).

    Call before the model is built and before any SDPA call of the run. On gfx950, where TF32
    is emulated and has a wrong-result report, fp32 matmul precision is set back to "highest".
    Returns the variables this call set.
    """
    applied = apply_env_vars(plan.env)
    if plan.tf32 and plan.hardware.vendor in ("nvidia", "amd"):
        torch.set_float32_matmul_precision("high")
    elif is_amd(plan.hardware, AMD_TF32_EMULATED):
        torch.set_float32_matmul_precision("highest")
    route_sdpa(plan.cudnn_sdpa)
    return applied


def _routed(original: Callable[..., Any], policy: str) -> Callable[..., Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    without_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    cudnn_first = [SDPBackend.CUDNN_ATTENTION, *without_cudnn]

    @functools.wraps(original)
    def sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: Any, *args: Any,
                               **kwargs: Any) -> Any:
        if attention_mask is not None:
            # cuDNN's masked backward returns NaN grad_q at seq % 128 == 64
            # (pytorch/pytorch#196678): any call with a mask goes to the other backends.
            with sdpa_kernel(without_cudnn):
                return original(module, query, key, value, attention_mask, *args, **kwargs)
        if policy == CUDNN_FIRST:
            with sdpa_kernel(cudnn_first, set_priority=True):
                return original(module, query, key, value, attention_mask, *args, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return sdpa_attention_forward


def route_sdpa(policy: str | None) -> bool:
    """Route transformers' "sdpa" attention per call: with a mask, never to cuDNN; without
    one, cuDNN first (`"first"`) or torch's own order (`"unmasked_only"`). `None` puts back
    transformers' own function if an earlier call routed it (and imports nothing otherwise).
    Idempotent: the wrapper always wraps the original.

    A per-call routing, because one process-wide priority cannot tell a masked call (padded or
    packed rows, pytorch/pytorch#196678) from an unmasked one. Returns True when routed.
    """
    if policy not in (None, CUDNN_FIRST, CUDNN_UNMASKED_ONLY):
        raise ValueError(f"unknown cuDNN SDPA routing {policy!r}")
    if policy is None and "transformers.modeling_utils" not in sys.modules:
        return False  # nothing can have been routed yet; keep CPU-only runs import-free
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    original = getattr(current, "__wrapped__", current)
    if policy is None:
        if original is not current:
            AttentionInterface.register("sdpa", original)
        return False
    AttentionInterface.register("sdpa", _routed(original, policy))
    logger.info("sdpa: cuDNN attention %s for calls without a mask; masked calls skip it",
                "first" if policy == CUDNN_FIRST else "in torch's order")
    return True


def apply_fused_ops(model: torch.nn.Module, ops: Sequence[str]) -> list[str]:
    """Patch a loaded Hugging Face model with Liger's `ops` (`plan.fused_ops`); returns the
    ops applied.

    A no-op (returns []) when `ops` is empty, or when Liger has no patch for the model's
    architecture (logged as a warning). Call before adapters are attached.

    Raises:
        ValueError: an op that is not one of LIGER_OPS.
    """
    unknown = [op for op in ops if op not in LIGER_OPS]
    if unknown:
        raise ValueError(f"unknown fused op(s) {unknown}; known: {', '.join(LIGER_OPS)}")
    if not ops:
        return []
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        logger.warning(
            "fused_ops: liger has no patch for model_type %r; running unfused", model_type
        )
        return []
    _apply_liger_kernel_to_instance(
        model=model,
        rms_norm="rms_norm" in ops,
        rope="rope" in ops,
        swiglu="swiglu" in ops,
        cross_entropy=False,
        fused_linear_cross_entropy="fused_linear_cross_entropy" in ops,
    )
    logger.info("fused_ops: liger applied to %s (%s)", model_type, ", ".join(ops))
    return list(ops)


def apply_loss_head(model: torch.nn.Module, choice: str) -> bool:
    """Carry out `plan.loss_head` on a loaded Hugging Face model: `chunked` turns its LM head
    into a `ChunkedLossHead` (finetune.kernels.chunked_loss), so the training loss never
    builds the whole logits; `liger` and `unfused` leave the head alone. Returns True when the
    chunked head was installed; a model it cannot serve (the head is not a plain nn.Linear,
    or the logits are rescaled after it) keeps the unfused loss, with a warning saying why.
    """
    if choice != "chunked":
        return False
    installed, why = install_chunked_head(model)
    if installed:
        logger.info("loss head: chunked (%s)", why)
    else:
        logger.warning("loss head: unfused, not chunked: %s", why)
    return installed


def apply_lora_kernel(model: torch.nn.Module, choice: str) -> int:
    """Carry out `plan.lora` on a model whose adapters are attached: `fused` gives every plain
    LoRA linear layer the fused forward (`finetune.kernels.lora_linear`), `peft` leaves peft's.
    Returns the number of layers fused (0 for a model without LoRA layers).

    Raises:
        ValueError: a choice that is not a LoRA candidate.
    """
    if choice not in LORA:
        raise ValueError(f"unknown LoRA kernel {choice!r}; known: {', '.join(LORA.names())}")
    if choice != "fused":
        return 0
    fused, other = fuse_lora_layers(model)
    if fused:
        logger.info("lora: fused forward on %d LoRA linear layers", fused)
    if other:
        logger.info("lora: %d LoRA layers keep peft's forward (not plain LoRA over nn.Linear)",
                    other)
    return fused
