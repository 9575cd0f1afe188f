"""Explicit kernel choices: honoured when possible, an error naming alternatives when not."""

from __future__ import annotations

import pytest

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.hardware.detect import GIB, profile_from_device_properties
from finetune.hardware.profile import DeviceProperties
from finetune.kernels import KernelOverrideError, ModelFacts, plan


def test_fa2_on_t4_is_impossible_and_names_alternatives() -> None:
    with pytest.raises(KernelOverrideError) as info:
        plan(profile_by_name("t4", "all"), KernelsConfig(attention="flash_attention_2"))
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.family, error.choice) == ("attention", "flash_attention_2")
    message = str(error)
    assert message.startswith("kernels.attention=flash_attention_2 is not possible here")
    assert "Tesla T4 (sm_75)" in message
    assert message.endswith("Use kernels.attention=auto or one of: sdpa, sdpa_varlen, eager")


def test_unknown_choice_is_an_override_error() -> None:
    with pytest.raises(KernelOverrideError, match="not a known attention choice"):
        plan(profile_by_name("a100"), KernelsConfig(attention="flash"))


def test_supported_override_is_honoured_with_reason() -> None:
    attention = plan(profile_by_name("a100", "all"), KernelsConfig(attention="sdpa")).kernels[
        "attention"
    ]
    assert attention.choice == "sdpa"
    assert "set by kernels.attention=sdpa" in attention.reason
    rejected = {r.name: r.reason for r in attention.rejected}
    assert rejected["flash_attention_2"] == "supported; not requested (kernels.attention=sdpa)"


@pytest.mark.parametrize(
    ("profile", "cfg", "match"),
    [
        ("cpu", KernelsConfig(precision="bf16"), "AMX-BF16"),
        ("t4", KernelsConfig(precision="bf16"), "emulates"),
        ("cpu", KernelsConfig(precision="fp16"), "fp16"),
        ("mps", KernelsConfig(optimizer="adamw_8bit"), "bitsandbytes"),
        ("cpu", KernelsConfig(optimizer="paged_adamw_8bit"), "adamw_8bit"),
        ("cpu", KernelsConfig(collective="nccl"), "NVIDIA or AMD"),
        ("h100", KernelsConfig(collective="xccl"), "Intel"),
        ("cpu", KernelsConfig(fused_ops="liger"), "CUDA, ROCm or XPU"),
        ("h100", KernelsConfig(fused_ops="liger"), "liger-kernel"),
        ("h100", KernelsConfig(attention="flash_attention_3"), "flash-attn-3"),
        ("mi300x", KernelsConfig(attention="sdpa_cudnn"), "needs NVIDIA sm80"),
        ("t4", KernelsConfig(attention="sdpa_cudnn"), "needs NVIDIA sm80"),
        ("a100", KernelsConfig(fused_linear_cross_entropy="on"), "fused_ops=liger"),
        ("mps", KernelsConfig(attention="flex_attention"), "no backward"),
    ],
)
def test_impossible_overrides_raise(profile: str, cfg: KernelsConfig, match: str) -> None:
    with pytest.raises(KernelOverrideError, match=match):
        plan(profile_by_name(profile), cfg)


def test_cpu_amx_can_force_bf16() -> None:
    assert plan(profile_by_name("cpu-amx"), KernelsConfig(precision="bf16")).choice(
        "precision"
    ) == "bf16"


def test_eight_bit_optimizers_only_on_request() -> None:
    auto = plan(profile_by_name("a100", "all"), KernelsConfig()).kernels["optimizer"]
    assert auto.choice == "adamw_fused"
    rejected = {r.name: r.reason for r in auto.rejected}
    assert "opt in with kernels.optimizer=adamw_8bit" in rejected["adamw_8bit"]
    forced = plan(profile_by_name("a100", "all"), KernelsConfig(optimizer="paged_adamw_8bit"))
    assert forced.choice("optimizer") == "paged_adamw_8bit"


def test_fp32_precision_rules_out_flash_attention() -> None:
    kernel_plan = plan(profile_by_name("a100", "all"), KernelsConfig(precision="fp32"))
    assert kernel_plan.choice("attention") == "sdpa"
    assert kernel_plan.kernels["attention"].details["sdpa_backend"] == "efficient"
    with pytest.raises(KernelOverrideError, match="fp16/bf16"):
        plan(profile_by_name("a100", "all"),
             KernelsConfig(precision="fp32", attention="flash_attention_2"))


def test_head_dim_above_256_rules_out_flash_attention() -> None:
    kernel_plan = plan(profile_by_name("a100", "all"), KernelsConfig(),
                       ModelFacts(num_heads=8, num_kv_heads=8, head_dim=512))
    assert kernel_plan.choice("attention") == "sdpa"
    rejected = {r.name: r.reason for r in kernel_plan.kernels["attention"].rejected}
    assert "head_dim <= 256" in rejected["flash_attention_2"]


def test_compile_on_is_refused_where_inductor_miscompiles() -> None:
    gfx906 = profile_from_device_properties(
        DeviceProperties(True, "AMD Instinct MI50", "gfx906:sramecc+:xnack-", 9, 0, 32 * GIB,
                         60, False, "x86_64"),
        device_count=1, runtime_version="6.4", torch_version="2.10.0",
        packages=frozenset({"triton"}),
    )
    auto = plan(gfx906, KernelsConfig())
    assert auto.choice("compile") == "off" and "miscompiles" in auto.kernels["compile"].reason
    assert auto.choice("precision") == "fp16"
    with pytest.raises(KernelOverrideError, match="miscompiles"):
        plan(gfx906, KernelsConfig(compile="on"))
    assert plan(profile_by_name("h100", "all"), KernelsConfig(compile="on")).choice(
        "compile"
    ) == "on"


def test_model_facts_validate_gqa_shape() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ModelFacts(num_heads=8, num_kv_heads=3, head_dim=32)
