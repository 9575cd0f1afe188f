"""Packed rows on GPUs: never a dense [T, T] mask when a path without one is available.

Golden: every simulated GPU profile x packing on/off x flash-attn installed or not (on top of
what a GPU build of torch ships: Triton, and torch's varlen attention from torch 2.10).
"""

from __future__ import annotations

import json

import pytest

from finetune.commands import env as env_command
from finetune.config.kernels import KernelsConfig
from finetune.hardware import PROFILE_NAMES, profile_by_name
from finetune.kernels import ModelFacts, plan
from finetune.kernels.attention import ATTENTION

FACTS = ModelFacts(num_heads=32, num_kv_heads=8, head_dim=128)
GPUS = tuple(n for n in PROFILE_NAMES
             if profile_by_name(n).vendor in ("nvidia", "amd", "intel"))

# profile -> (whole rows, packed rows) without and with flash-attn (FA2) installed.
GOLDEN = {
    #                 no flash-attn                     flash-attn
    "xpu-max1550": (("sdpa", "flex_attention"), ("sdpa", "flex_attention")),
    "t4": (("sdpa", "sdpa_varlen"), ("sdpa", "sdpa_varlen")),
    "v100": (("sdpa", "sdpa_varlen"), ("sdpa", "sdpa_varlen")),
    "a100": (("sdpa", "varlen_attn"), ("flash_attention_2", "flash_attention_2")),
    "l40s": (("sdpa", "varlen_attn"), ("flash_attention_2", "flash_attention_2")),
    "rtx4090": (("sdpa", "varlen_attn"), ("flash_attention_2", "flash_attention_2")),
    "h100": (("sdpa_cudnn", "varlen_attn"), ("sdpa_cudnn", "flash_attention_2")),
    "h200": (("sdpa_cudnn", "varlen_attn"), ("sdpa_cudnn", "flash_attention_2")),
    "gh200": (("sdpa_cudnn", "varlen_attn"), ("sdpa_cudnn", "flash_attention_2")),
    "b200": (("sdpa_cudnn", "varlen_attn"), ("sdpa_cudnn", "flash_attention_2")),
    "rtx5090": (("sdpa", "varlen_attn"), ("flash_attention_2", "flash_attention_2")),
    "mi250x": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "mi300x": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "mi300a": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "mi325x": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "mi355x": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "rx7900xtx": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
    "rx9070": (("sdpa", "flex_attention"), ("flash_attention_2", "flash_attention_2")),
}


def _profile(name: str, flash_attn: bool):
    profile = profile_by_name(name)
    return profile.with_packages(profile.packages | ({"flash-attn"} if flash_attn else set()))


def test_golden_covers_every_gpu_profile() -> None:
    assert set(GOLDEN) == set(GPUS)


@pytest.mark.parametrize("name", GPUS)
@pytest.mark.parametrize("flash_attn", [False, True], ids=["no-flash-attn", "flash-attn"])
@pytest.mark.parametrize("packing", [False, True], ids=["whole", "packed"])
def test_golden_attention(name: str, flash_attn: bool, packing: bool) -> None:
    kernel_plan = plan(_profile(name, flash_attn), KernelsConfig(), FACTS, packing=packing)
    assert kernel_plan.choice("attention") == GOLDEN[name][flash_attn][packing]


@pytest.mark.parametrize("name", PROFILE_NAMES)
@pytest.mark.parametrize("packages", ["none", "flash-attn", "all"])
def test_packed_rows_never_get_a_dense_mask_when_another_path_is_there(name: str,
                                                                       packages: str) -> None:
    profile = (profile_by_name(name, packages) if packages != "flash-attn"
               else _profile(name, flash_attn=True))
    kernel_plan = plan(profile, KernelsConfig(), FACTS, packing=True)
    facts = kernel_plan.model_facts
    without_dense_mask = [c.name for c in ATTENTION
                          if c.packing_isolation in ("varlen", "flex_block_mask")
                          and c.supports(profile, facts)[0]]
    assert without_dense_mask  # sdpa_varlen runs everywhere
    assert kernel_plan.packing_isolation in ("varlen", "flex_block_mask"), kernel_plan.choice(
        "attention")
    assert kernel_plan.cudnn_sdpa != "first"  # cuDNN attention only for rows without a mask


def test_the_reason_says_which_path_and_why() -> None:
    attention = plan(profile_by_name("h100"), KernelsConfig(), FACTS,
                     packing=True).kernels["attention"]
    assert attention.choice == "varlen_attn"
    assert "no dense mask" in attention.reason and "pytorch/pytorch#164502" in attention.reason
    assert "sdpa_cudnn: packed rows carry a 4D mask" in attention.reason  # ranked above, refused
    rejected = {r.name: r.reason for r in attention.rejected}
    assert rejected["sdpa"].startswith("supported; ranked below varlen_attn on nvidia_hopper "
                                       "for packed rows")
    assert "dense block-diagonal [T, T] mask" in rejected["sdpa"]
    assert rejected["flex_attention"].startswith("supported; ranked below varlen_attn")


@pytest.mark.parametrize("name", ["h100", "mi300x", "xpu-max1550", "a100"])
def test_gpu_profiles_have_triton_so_flex_is_not_refused(name: str) -> None:
    kernel_plan = plan(profile_by_name(name, "none"), KernelsConfig(attention="flex_attention"))
    assert kernel_plan.choice("attention") == "flex_attention"


def test_varlen_attn_needs_torch_2_10_nvidia_sm80_and_half_precision() -> None:
    from dataclasses import replace

    supports = ATTENTION.get("varlen_attn").supports
    bf16 = replace(FACTS, dtype="bf16")
    assert supports(profile_by_name("a100"), bf16)[0]
    old = replace(profile_by_name("a100"), torch="2.9.1")
    assert "torch 2.10+" in supports(old, bf16)[1] and not supports(old, bf16)[0]
    for name in ("mi300x", "t4", "cpu", "xpu-max1550"):
        ok, why = supports(profile_by_name(name), bf16)
        assert not ok and why.startswith("needs NVIDIA sm80+"), name
    assert not supports(profile_by_name("a100"), replace(FACTS, dtype="fp32"))[0]


def test_cudnn_recompile_flag_on_sm90_and_sm100_only() -> None:
    for name in PROFILE_NAMES:
        kernel_plan = plan(profile_by_name(name), KernelsConfig())
        flag = kernel_plan.env.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE")
        wanted = kernel_plan.hardware.arch in ("sm_90", "sm_100", "sm_103")
        assert flag == ("1" if wanted else None), name
        if wanted:
            assert "pytorch/pytorch#155958" in kernel_plan.env_reasons[
                "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"]


def test_finetune_env_plans_for_the_configs_packing(capsys) -> None:
    assert env_command.main(["--profile", "h100", "--json", "data.packing=true"]) == 0
    attention = json.loads(capsys.readouterr().out)["kernels"]["attention"]
    assert attention["choice"] == "varlen_attn" and attention["packing"] is True
    assert env_command.main(["--profile", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernels"]["attention"]["choice"] == "sdpa_cudnn"
