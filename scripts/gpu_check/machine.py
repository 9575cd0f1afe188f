"""versions: torch, CUDA/ROCm, cuDNN, the flash-attn distributions, Liger, bitsandbytes, and
which of finetune's dependencies are missing; plan: the detected profile and the auto plan for
whole and packed rows, its environment applied before any SDPA call of the check."""

from __future__ import annotations

import importlib.util
from typing import Any

from .context import Context

FLASH_DISTRIBUTIONS = ("flash-attn", "flash-attn-3", "flash-attn-4")
OTHER_DISTRIBUTIONS = ("liger-kernel", "bitsandbytes", "triton", "pytorch-triton-rocm",
                       "transformers", "accelerate", "peft", "deepspeed")
# finetune's dependencies an image with torch and the Hugging Face stack often lacks, by import
# name (the sections that need one say "skipped: needs ...").
NODE_MAY_LACK = ("hydra", "omegaconf", "orjson", "datasets", "wandb")


def section_versions(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    from finetune.dependencies import DISTRIBUTION_OF_MODULE
    from finetune.hardware.detect import distribution_version, flash_attn_build

    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["rocm"] = torch.version.hip
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["flash_attn_distributions"] = {d: distribution_version(d) for d in FLASH_DISTRIBUTIONS}
    out["flash_attn_build"] = flash_attn_build()
    out["packages"] = {d: distribution_version(d) for d in OTHER_DISTRIBUTIONS}
    out["missing_packages"] = [DISTRIBUTION_OF_MODULE.get(name, name) for name in NODE_MAY_LACK
                               if importlib.util.find_spec(name) is None]
    if ctx.gpu:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def section_plan(ctx: Context, out: dict[str, Any]) -> None:
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.kernels import TORCH_DTYPES, ModelFacts, apply_env, format_plan_table, plan

    ctx.profile = detect()
    facts = ModelFacts(32, 8, 64)  # the lora section's model
    # plan() applies its environment before its self-checks, then apply_env applies it
    # (again), TF32 and the SDPA routing, before any SDPA call of this script.
    ctx.plan = plan(ctx.profile, KernelsConfig(), facts)
    out["env_applied"] = apply_env(ctx.plan)
    ctx.dtype = TORCH_DTYPES[ctx.plan.precision] if ctx.gpu else ctx.dtype
    packed = plan(ctx.profile, KernelsConfig(), facts, run_selfcheck=False, packing=True)
    ctx.packed_plan = packed
    out["plan"] = ctx.plan.to_dict()
    out["packed_attention"] = packed.kernels["attention"].to_dict()
    out["table"] = format_plan_table(ctx.plan).splitlines()
