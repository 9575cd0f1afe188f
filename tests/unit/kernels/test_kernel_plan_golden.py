"""Golden table: every named profile, with every optional package and with none."""

from __future__ import annotations

import pytest

from finetune.config.kernels import KernelsConfig
from finetune.hardware import PROFILE_NAMES, profile_by_name
from finetune.kernels import plan

# profile -> (attention, optimizer, fused_ops, precision, collective), every package installed.
GOLDEN_ALL = {
    "cpu": ("sdpa", "adamw_fused", "none", "fp32", "gloo"),
    "cpu-amx": ("sdpa", "adamw_fused", "none", "bf16", "gloo"),
    "mps": ("sdpa", "adamw_fused", "none", "bf16", "gloo"),
    "xpu-max1550": ("sdpa", "adamw_fused", "liger", "bf16", "xccl"),
    "t4": ("sdpa", "adamw_fused", "none", "fp16", "nccl"),
    "v100": ("sdpa", "adamw_fused", "none", "fp16", "nccl"),
    "a100": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "l40s": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rtx4090": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "h100": ("flash_attention_3", "adamw_fused", "liger", "bf16", "nccl"),
    "h200": ("flash_attention_3", "adamw_fused", "liger", "bf16", "nccl"),
    "gh200": ("flash_attention_3", "adamw_fused", "liger", "bf16", "nccl"),
    "b200": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rtx5090": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi250x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi300x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi300a": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi325x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi355x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rx7900xtx": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rx9070": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
}

# No optional package: attention falls back to SDPA and nothing is fused, everywhere.
GOLDEN_NONE = {
    name: ("sdpa", optimizer, "none", precision, collective)
    for name, (_, optimizer, _, precision, collective) in GOLDEN_ALL.items()
}

# profile -> the SDPA backend torch takes with no packages (causal call, no mask).
GOLDEN_SDPA_BACKEND = {
    "cpu": "flash", "cpu-amx": "flash", "mps": "math", "xpu-max1550": "math",
    "t4": "efficient", "v100": "efficient", "a100": "flash", "l40s": "flash",
    "rtx4090": "flash", "h100": "flash", "h200": "flash", "gh200": "flash", "b200": "flash",
    "rtx5090": "flash", "mi250x": "flash", "mi300x": "flash", "mi300a": "flash",
    "mi325x": "flash", "mi355x": "flash", "rx7900xtx": "flash", "rx9070": "flash",
}

# profile -> environment variables the plan sets (the rest set none).
GOLDEN_ENV = {
    "mi300x": {"HIPBLASLT_ALLOW_TF32": "1"},
    "mi300a": {"HIPBLASLT_ALLOW_TF32": "1"},
    "mi325x": {"HIPBLASLT_ALLOW_TF32": "1"},
    "mi355x": {"HIPBLASLT_ALLOW_TF32": "1", "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"},
    "rx9070": {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"},
}


def _choices(name: str, packages: str) -> tuple[str, ...]:
    kernel_plan = plan(profile_by_name(name, packages), KernelsConfig())
    return tuple(
        kernel_plan.choice(f)
        for f in ("attention", "optimizer", "fused_ops", "precision", "collective")
    )


def test_golden_covers_every_profile() -> None:
    assert set(GOLDEN_ALL) == set(PROFILE_NAMES)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_golden_all_packages(name: str) -> None:
    assert _choices(name, "all") == GOLDEN_ALL[name]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_golden_no_packages(name: str) -> None:
    assert _choices(name, "none") == GOLDEN_NONE[name]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_golden_sdpa_backend_env_and_compile(name: str) -> None:
    kernel_plan = plan(profile_by_name(name), KernelsConfig())
    attention = kernel_plan.kernels["attention"]
    assert attention.details["sdpa_backend"] == GOLDEN_SDPA_BACKEND[name]
    if attention.details["sdpa_backend"] == "math":
        assert "MATH" in attention.reason  # named loudly
    assert kernel_plan.env == GOLDEN_ENV.get(name, {})
    assert kernel_plan.choice("compile") == "off"
    assert attention.details["selfcheck"] == "not run (simulated profile)"


@pytest.mark.parametrize(
    ("name", "grad_scaler", "tf32"),
    [("t4", True, False), ("a100", False, True), ("mi250x", False, False), ("cpu", False, False)],
)
def test_golden_precision_details(name: str, grad_scaler: bool, tf32: bool) -> None:
    details = plan(profile_by_name(name), KernelsConfig()).kernels["precision"].details
    assert details["grad_scaler"] is grad_scaler
    assert details["tf32"] is tf32
    assert details["trainable_dtype"] == "fp32"


def test_flce_off_by_default_on_gfx950_only() -> None:
    mi355x = plan(profile_by_name("mi355x", "all"), KernelsConfig()).kernels["fused_ops"]
    mi300x = plan(profile_by_name("mi300x", "all"), KernelsConfig()).kernels["fused_ops"]
    assert "fused_linear_cross_entropy" not in mi355x.details["ops"]
    assert "2.5x slower" in mi355x.details["fused_linear_cross_entropy"]
    assert "fused_linear_cross_entropy" in mi300x.details["ops"]
    forced = plan(
        profile_by_name("mi355x", "all"), KernelsConfig(fused_linear_cross_entropy="on")
    ).kernels["fused_ops"]
    assert "fused_linear_cross_entropy" in forced.details["ops"]
