"""KernelPlan output: kernel_plan.json format, the start-of-run table, dtypes, packing."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import (
    FAMILIES,
    format_plan_table,
    packing_isolation,
    plan,
    supports_packing,
)

HARDWARE_KEYS = {"vendor", "arch", "name", "device_count", "memory_gb", "unified_memory",
                 "peak_bf16_tflops", "runtime", "torch"}


@pytest.mark.parametrize("name", ["cpu", "h100", "mi355x"])
def test_to_dict_is_the_kernel_plan_json_format(name: str) -> None:
    data = json.loads(json.dumps(plan(profile_by_name(name, "all"), KernelsConfig()).to_dict()))
    assert set(data) == {"hardware", "kernels", "env"}
    assert HARDWARE_KEYS <= set(data["hardware"])
    assert list(data["kernels"]) == list(FAMILIES)
    for family in data["kernels"].values():
        assert isinstance(family["choice"], str) and family["reason"]
        for rejection in family["rejected"]:
            assert set(rejection) == {"name", "reason"} and rejection["reason"]
    assert "selfcheck" in data["kernels"]["attention"]
    assert set(data["kernels"]["precision"]) >= {"base_dtype", "autocast", "grad_scaler"}
    assert all(isinstance(v, str) for v in data["env"].values())


def test_format_plan_table_has_one_line_per_family() -> None:
    kernel_plan = plan(profile_by_name("mi355x"), KernelsConfig())
    lines = format_plan_table(kernel_plan).splitlines()
    assert lines[0].startswith("hardware: AMD Instinct MI355X")
    for family in FAMILIES:
        line = next(x for x in lines if x.startswith(f"{family}: "))
        assert line.startswith(f"{family}: {kernel_plan.choice(family)} (") and line.endswith(")")
    assert any(x.startswith("env: TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 (") for x in lines)


@pytest.mark.parametrize(
    ("name", "base", "autocast", "scaler"),
    [("a100", torch.bfloat16, torch.bfloat16, False), ("t4", torch.float16, torch.float16, True),
     ("cpu", torch.float32, None, False), ("cpu-amx", torch.bfloat16, torch.bfloat16, False)],
)
def test_plan_dtype_properties(name: str, base, autocast, scaler: bool) -> None:
    kernel_plan = plan(profile_by_name(name), KernelsConfig())
    assert kernel_plan.base_dtype == base
    assert kernel_plan.autocast_dtype == autocast
    assert kernel_plan.grad_scaler is scaler


@pytest.mark.parametrize(
    ("attention", "isolation"),
    [("flash_attention_2", "varlen"), ("flash_attention_3", "varlen"),
     ("flash_attention_4", "varlen"), ("sdpa", "block_mask_4d"), ("eager", "block_mask_4d"),
     ("flex_attention", "flex_block_mask"), ("varlen_attn", "varlen"),
     ("sdpa_varlen", "varlen"), ("not_an_attention", None),
     ("sdpa_cudnn", None)],  # packed rows carry a mask, which cuDNN must not take
)
def test_packing_isolation(attention: str, isolation: str | None) -> None:
    assert packing_isolation(attention) == isolation
    assert supports_packing(attention) is (isolation is not None)


def test_plan_records_packing_isolation() -> None:
    assert plan(profile_by_name("a100", "all"), KernelsConfig()).packing_isolation == "varlen"
    assert plan(profile_by_name("cpu"), KernelsConfig()).packing_isolation == "varlen"
    assert plan(profile_by_name("cpu"), KernelsConfig(attention="sdpa")).packing_isolation == (
        "block_mask_4d")
    packed = plan(profile_by_name("b200"), KernelsConfig(attention="sdpa"), packing=True)
    assert packed.packing_isolation == "block_mask_4d" and packed.to_dict()["kernels"][
        "attention"]["packing"] is True
    assert plan(profile_by_name("b200"), KernelsConfig(), packing=True).packing_isolation == (
        "varlen")


def test_format_plan_table_shows_routing_and_packing() -> None:
    text = format_plan_table(plan(profile_by_name("h100"), KernelsConfig()))
    line = next(x for x in text.splitlines() if x.startswith("attention: "))
    assert line.startswith("attention: sdpa_cudnn (")
    for part in ("attn_implementation=sdpa", "cuDNN routing first", "packing off"):
        assert part in line
    packed = format_plan_table(plan(profile_by_name("h100"), KernelsConfig(attention="sdpa"),
                                    packing=True))
    assert "packing on" in packed and "cuDNN routing unmasked_only" in packed

