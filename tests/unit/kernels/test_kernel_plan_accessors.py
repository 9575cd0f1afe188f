"""KernelPlan's typed accessors: what components read instead of kernel_plan.json's dicts."""

from __future__ import annotations

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.errors import ConfigError
from finetune.hardware import PROFILE_NAMES, profile_by_name
from finetune.kernels import KernelOverrideError, plan

ALL_LIGER = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")


@pytest.mark.parametrize(
    ("name", "precision", "dtype", "mixed", "collective", "fused_ops"),
    [
        ("cpu", "fp32", torch.float32, "no", "gloo", ()),
        ("cpu-amx", "bf16", torch.bfloat16, "bf16", "gloo", ()),
        ("mps", "bf16", torch.bfloat16, "bf16", "gloo", ()),
        ("t4", "fp16", torch.float16, "fp16", "nccl", ()),
        ("h100", "bf16", torch.bfloat16, "bf16", "nccl", ALL_LIGER),
        ("mi355x", "bf16", torch.bfloat16, "bf16", "nccl", ALL_LIGER[:3]),  # no FLCE on gfx950
        ("xpu-max1550", "bf16", torch.bfloat16, "bf16", "xccl", ALL_LIGER),
    ],
)
def test_accessors_per_profile(name: str, precision: str, dtype: torch.dtype, mixed: str,
                               collective: str, fused_ops: tuple[str, ...]) -> None:
    kernel_plan = plan(profile_by_name(name, "all"), KernelsConfig())
    assert kernel_plan.precision == precision
    assert kernel_plan.compute_dtype == dtype
    assert kernel_plan.base_dtype == dtype
    assert kernel_plan.mixed_precision == mixed
    assert kernel_plan.optimizer == "adamw_fused"
    assert kernel_plan.compile is False  # compile is opt-in on every machine
    assert kernel_plan.collective == collective
    assert kernel_plan.fused_ops == fused_ops


@pytest.mark.parametrize(
    ("overrides", "accessor", "value"),
    [
        ({"precision": "fp32"}, "mixed_precision", "no"),
        ({"precision": "fp32"}, "compute_dtype", torch.float32),
        ({"precision": "fp16"}, "mixed_precision", "fp16"),
        ({"optimizer": "paged_adamw_8bit"}, "optimizer", "paged_adamw_8bit"),
        ({"compile": "on"}, "compile", True),
        ({"collective": "gloo"}, "collective", "gloo"),
        ({"fused_ops": "none"}, "fused_ops", ()),
        ({"fused_linear_cross_entropy": "off"}, "fused_ops", ALL_LIGER[:3]),
    ],
)
def test_accessors_follow_overrides(overrides: dict, accessor: str, value: object) -> None:
    kernel_plan = plan(profile_by_name("h100", "all"), KernelsConfig(**overrides))
    assert getattr(kernel_plan, accessor) == value


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_accessors_agree_with_kernel_plan_json(name: str) -> None:
    kernel_plan = plan(profile_by_name(name, "all"), KernelsConfig())
    kernels = kernel_plan.to_dict()["kernels"]
    assert kernel_plan.precision == kernels["precision"]["choice"]
    assert kernel_plan.optimizer == kernels["optimizer"]["choice"]
    assert kernel_plan.compile is (kernels["compile"]["choice"] == "on")
    assert kernel_plan.collective == kernels["collective"]["choice"]
    assert kernel_plan.fused_ops == tuple(kernels["fused_ops"]["ops"])
    assert kernel_plan.tf32 is kernels["precision"]["tf32"]


def test_override_error_is_a_config_error_with_exit_code_2() -> None:
    with pytest.raises(ConfigError) as info:
        plan(profile_by_name("cpu"), KernelsConfig(compile="sometimes"))
    assert isinstance(info.value, KernelOverrideError)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("kernels.compile=sometimes is not possible here: ")
