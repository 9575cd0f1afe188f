"""apply: the plan's env vars and torch globals, and Liger patches from the op names alone."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import apply_env, apply_fused_ops, plan


@pytest.fixture
def matmul_precision_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    return calls


def test_apply_env_sets_variables_and_keeps_user_values(monkeypatch, matmul_precision_calls) -> None:
    kernel_plan = plan(profile_by_name("mi355x"), KernelsConfig())
    monkeypatch.delenv("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL", raising=False)
    monkeypatch.setenv("HIPBLASLT_ALLOW_TF32", "0")
    applied = apply_env(kernel_plan)
    assert applied == {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"}
    assert os.environ["TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"] == "1"
    assert os.environ["HIPBLASLT_ALLOW_TF32"] == "0"


@pytest.mark.parametrize(("name", "tf32"), [("a100", True), ("t4", False), ("cpu", False)])
def test_apply_env_enables_tf32_only_where_planned(matmul_precision_calls, name: str,
                                                   tf32: bool) -> None:
    kernel_plan = plan(profile_by_name(name), KernelsConfig())
    assert kernel_plan.tf32 is tf32
    apply_env(kernel_plan)
    assert matmul_precision_calls == (["high"] if tf32 else [])


@pytest.fixture
def fake_liger(monkeypatch) -> list[dict]:
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


def test_apply_fused_ops_with_no_ops_is_a_no_op(fake_liger) -> None:
    # Liger is importable and knows the model, so only the empty op list keeps it from patching.
    assert apply_fused_ops(_model("llama"), ()) == []
    assert fake_liger == []


def test_cpu_plan_patches_nothing() -> None:
    kernel_plan = plan(profile_by_name("cpu", "all"), KernelsConfig())
    assert apply_fused_ops(torch.nn.Linear(2, 2), kernel_plan.fused_ops) == []


@pytest.mark.parametrize(("profile", "flce"), [("h100", True), ("mi355x", False)])
def test_apply_fused_ops_patches_the_planned_ops(fake_liger, profile: str, flce: bool) -> None:
    model = _model("llama")
    ops = apply_fused_ops(model, plan(profile_by_name(profile, "all"), KernelsConfig()).fused_ops)
    assert ("fused_linear_cross_entropy" in ops) is flce
    (call,) = fake_liger
    assert call["model"] is model
    assert call["rms_norm"] and call["rope"] and call["swiglu"] and not call["cross_entropy"]
    assert call["fused_linear_cross_entropy"] is flce


def test_apply_fused_ops_patches_only_the_given_ops(fake_liger) -> None:
    assert apply_fused_ops(_model("llama"), ["rms_norm"]) == ["rms_norm"]
    (call,) = fake_liger
    assert call["rms_norm"]
    assert not (call["rope"] or call["swiglu"] or call["fused_linear_cross_entropy"])


def test_apply_fused_ops_skips_unknown_architectures(fake_liger) -> None:
    assert apply_fused_ops(_model("my_custom_lm"), ("rms_norm", "swiglu")) == []
    assert fake_liger == []


def test_apply_fused_ops_rejects_unknown_op_names(fake_liger) -> None:
    with pytest.raises(ValueError, match="unknown fused op"):
        apply_fused_ops(_model("llama"), ("rms_norm", "layer_norm"))
    assert fake_liger == []
