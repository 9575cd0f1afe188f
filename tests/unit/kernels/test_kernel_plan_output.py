"""KernelPlan output: kernel_plan.json format, the start-of-run table, env, packing, Liger."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import (
    FAMILIES,
    apply_env,
    apply_fused_ops,
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


def test_apply_env_sets_variables_and_keeps_user_values(monkeypatch) -> None:
    kernel_plan = plan(profile_by_name("mi355x"), KernelsConfig())
    monkeypatch.delenv("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", raising=False)
    monkeypatch.setenv("HIPBLASLT_ALLOW_TF32", "0")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    applied = apply_env(kernel_plan)
    import os

    assert applied == {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"}
    assert os.environ["TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"] == "1"
    assert os.environ["HIPBLASLT_ALLOW_TF32"] == "0"


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
     ("sdpa", "block_mask_4d"), ("eager", "block_mask_4d"),
     ("flex_attention", "flex_block_mask"), ("not_an_attention", None)],
)
def test_packing_isolation(attention: str, isolation: str | None) -> None:
    assert packing_isolation(attention) == isolation
    assert supports_packing(attention) is (isolation is not None)


def test_plan_records_packing_isolation() -> None:
    assert plan(profile_by_name("a100", "all"), KernelsConfig()).packing_isolation == "varlen"
    assert plan(profile_by_name("cpu"), KernelsConfig()).packing_isolation == "block_mask_4d"


def test_apply_fused_ops_none_is_a_no_op() -> None:
    model = torch.nn.Linear(2, 2)
    assert apply_fused_ops(model, plan(profile_by_name("cpu"), KernelsConfig())) == []


@pytest.fixture
def fake_liger(monkeypatch):
    calls: list[dict] = []
    module = types.ModuleType("liger_kernel.transformers.monkey_patch")
    module.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": object()}  # type: ignore[attr-defined]
    module._apply_liger_kernel_to_instance = lambda **kw: calls.append(kw)  # type: ignore[attr-defined]
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", module)
    return calls


def _model(model_type: str) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type=model_type)  # type: ignore[assignment]
    return model


@pytest.mark.parametrize(("profile", "flce"), [("h100", True), ("mi355x", False)])
def test_apply_fused_ops_patches_with_liger(fake_liger, profile: str, flce: bool) -> None:
    model = _model("llama")
    ops = apply_fused_ops(model, plan(profile_by_name(profile, "all"), KernelsConfig()))
    assert ("fused_linear_cross_entropy" in ops) is flce
    (call,) = fake_liger
    assert call["model"] is model
    assert call["rms_norm"] and call["rope"] and call["swiglu"] and not call["cross_entropy"]
    assert call["fused_linear_cross_entropy"] is flce


def test_apply_fused_ops_skips_unknown_architectures(fake_liger) -> None:
    kernel_plan = plan(profile_by_name("h100", "all"), KernelsConfig())
    assert apply_fused_ops(_model("my_custom_lm"), kernel_plan) == []
    assert fake_liger == []
