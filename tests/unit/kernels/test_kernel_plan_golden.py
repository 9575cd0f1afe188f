"""Golden table: every named profile, with every optional package and with none, for whole rows
and for packed rows."""

from __future__ import annotations

import pytest

from finetune.config.kernels import KernelsConfig
from finetune.hardware import PROFILE_NAMES, profile_by_name
from finetune.kernels import plan

# profile -> (attention, optimizer, fused_ops, precision, collective), every package installed.
GOLDEN_ALL = {
    "cpu": ("sdpa_varlen", "adamw_fused", "none", "fp32", "gloo"),
    "cpu-amx": ("sdpa_varlen", "adamw_fused", "none", "bf16", "gloo"),
    # AVX512-BF16 without AMX: bf16 matmuls are slower than fp32 ones (finetune.kernels.precision).
    "cpu-avx512bf16": ("sdpa_varlen", "adamw_fused", "none", "fp32", "gloo"),
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
    "b200": ("sdpa_cudnn", "adamw_fused", "liger", "bf16", "nccl"),
    "rtx5090": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi250x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi300x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi300a": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi325x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "mi355x": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rx7900xtx": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
    "rx9070": ("flash_attention_2", "adamw_fused", "liger", "bf16", "nccl"),
}

# Packed rows, every package: sdpa_cudnn is refused (packed rows carry a mask,
# pytorch/pytorch#196678), so B200 takes FA4's varlen path; on XPU masked SDPA falls to MATH
# (intel/torch-xpu-ops#2390), so flex leads; where the whole-row choice is sdpa (a dense mask
# for packed rows) SDPA runs once per document instead. Elsewhere the whole-row choice stays.
GOLDEN_ALL_PACKED = {
    name: {"b200": "flash_attention_4", "xpu-max1550": "flex_attention", "mps": "sdpa_varlen",
           "t4": "sdpa_varlen", "v100": "sdpa_varlen"}.get(name, choices[0])
    for name, choices in GOLDEN_ALL.items()
}

# No optional package: nothing is fused and attention is torch's: sdpa, except on Hopper and
# datacenter Blackwell, where cuDNN attention (in torch, no package) leads for whole rows, and on
# CPUs, where SDPA runs once per document of padding-free rows (sdpa_varlen).
_CUDNN_FIRST = ("h100", "h200", "gh200", "b200")
_CPUS = ("cpu", "cpu-amx", "cpu-avx512bf16")
_NO_PACKAGE_ATTENTION = {**{name: "sdpa_cudnn" for name in _CUDNN_FIRST},
                         **{name: "sdpa_varlen" for name in _CPUS}}
GOLDEN_NONE = {
    name: (_NO_PACKAGE_ATTENTION.get(name, "sdpa"), optimizer, "none", precision, collective)
    for name, (_, optimizer, _, precision, collective) in GOLDEN_ALL.items()
}
# Packed rows, no separately installed package: never a dense mask. torch's in-tree varlen
# attention on NVIDIA sm80+, flex (Triton ships with GPU builds of torch) on AMD and XPU, SDPA
# once per document elsewhere (finetune.kernels.attention).
_VARLEN_ATTN = ("a100", "l40s", "rtx4090", "h100", "h200", "gh200", "b200", "rtx5090")
_FLEX = ("xpu-max1550", "mi250x", "mi300x", "mi300a", "mi325x", "mi355x", "rx7900xtx", "rx9070")
GOLDEN_NONE_PACKED = {
    name: ("varlen_attn" if name in _VARLEN_ATTN else "flex_attention" if name in _FLEX
           else "sdpa_varlen")
    for name in GOLDEN_ALL
}

# profile -> the SDPA backend torch takes with no packages, causal call without a mask.
GOLDEN_SDPA_BACKEND = {
    "cpu": "flash", "cpu-amx": "flash", "cpu-avx512bf16": "flash", "mps": "math",
    "xpu-max1550": "math", "t4": "efficient", "v100": "efficient", "a100": "flash", "l40s": "flash",
    "rtx4090": "flash", "h100": "cudnn", "h200": "cudnn", "gh200": "cudnn", "b200": "cudnn",
    "rtx5090": "flash", "mi250x": "flash", "mi300x": "flash", "mi300a": "flash",
    "mi325x": "flash", "mi355x": "flash", "rx7900xtx": "flash", "rx9070": "flash",
}
# ... and with a 4D mask (padded or packed rows): never cuDNN, never flash on GPUs.
GOLDEN_SDPA_BACKEND_MASKED = {
    **{name: "efficient" for name in GOLDEN_SDPA_BACKEND},
    "cpu": "flash", "cpu-amx": "flash", "cpu-avx512bf16": "flash", "mps": "math",
    "xpu-max1550": "math",
}

# profile -> environment variables the plan sets with no packages (the rest set none). The
# AOTriton flag on every AMD GPU: the experimental set differs between AOTriton versions.
_AOTRITON = {"TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL": "1"}
# Where torch prefers cuDNN attention, which builds a graph per new shape (pytorch/pytorch#155958).
_CUDNN_RECOMPILE = {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}
GOLDEN_ENV = {
    **{name: _CUDNN_RECOMPILE for name in _CUDNN_FIRST},
    "mi250x": _AOTRITON,
    "mi300x": {**_AOTRITON, "HIPBLASLT_ALLOW_TF32": "1"},
    "mi300a": {**_AOTRITON, "HIPBLASLT_ALLOW_TF32": "1"},
    "mi325x": {**_AOTRITON, "HIPBLASLT_ALLOW_TF32": "1"},
    "mi355x": {**_AOTRITON, "HIPBLASLT_ALLOW_TF32": "0"},  # gfx950: TF32 only emulated
    "rx7900xtx": _AOTRITON,
    "rx9070": _AOTRITON,
}


def _choices(name: str, packages: str) -> tuple[str, ...]:
    kernel_plan = plan(profile_by_name(name, packages), KernelsConfig())
    return tuple(
        kernel_plan.choice(f)
        for f in ("attention", "optimizer", "fused_ops", "precision", "collective")
    )


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_golden_packed_attention(name: str) -> None:
    for packages, golden in (("all", GOLDEN_ALL_PACKED), ("none", GOLDEN_NONE_PACKED)):
        kernel_plan = plan(profile_by_name(name, packages), KernelsConfig(), packing=True)
        assert kernel_plan.choice("attention") == golden[name], packages
        assert kernel_plan.packing and kernel_plan.packing_isolation is not None


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
    assert attention.details["sdpa_backend_masked"] == GOLDEN_SDPA_BACKEND_MASKED[name]
    assert attention.details["attn_implementation"] == (
        "sdpa_varlen" if name in _CPUS else "sdpa")
    if attention.details["sdpa_backend"] == "math":
        assert "MATH" in attention.reason  # named loudly
    assert kernel_plan.env == GOLDEN_ENV.get(name, {})
    assert kernel_plan.choice("compile") == "off"
    assert attention.details["selfcheck"] == "not run (simulated profile)"


@pytest.mark.parametrize(
    ("name", "grad_scaler", "tf32"),
    [("t4", True, False), ("a100", False, True), ("mi250x", False, False), ("cpu", False, False),
     ("cpu-avx512bf16", False, False)],
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
