"""Attention ranked per architecture and per packing mode, each choice with its reason; the
environment is in place before any self-check runs."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from finetune.config.kernels import KernelsConfig
from finetune.hardware import detect, profile_by_name
from finetune.kernels import (
    AttentionCandidate,
    KernelOverrideError,
    ModelFacts,
    default_registries,
    plan,
)
from finetune.kernels import planner as planner_module
from finetune.kernels.attention import ATTENTION, sdpa_backend

FACTS = ModelFacts(num_heads=32, num_kv_heads=8, head_dim=128)


def _attention(name: str, packages: str = "all", *, packing: bool = False, facts=FACTS,
               profile=None, **cfg: str):
    kernel_plan = plan(profile or profile_by_name(name, packages), KernelsConfig(**cfg), facts,
                       packing=packing)
    return kernel_plan, kernel_plan.kernels["attention"]


def _rejected(decision) -> dict[str, str]:
    return {r.name: r.reason for r in decision.rejected}


@pytest.mark.parametrize(("name", "source"), [
    ("h100", "huggingface/transformers#48163"),  # 1.7-2.3x faster than SDPA flash on Hopper
    ("b200", "Dao-AILab/flash-attention#1589"),  # FA2 reaches only ~300-380 fwd TFLOP/s
])
def test_cudnn_sdpa_leads_whole_rows_where_it_is_fastest(name: str, source: str) -> None:
    kernel_plan, attention = _attention(name, "none")
    assert attention.choice == "sdpa_cudnn" and source in attention.reason
    assert kernel_plan.attn_implementation == "sdpa"  # what transformers loads
    assert kernel_plan.cudnn_sdpa == "first"
    assert attention.details["sdpa_backend"] == "cudnn"
    assert attention.details["sdpa_backend_masked"] == "efficient"  # masked calls skip cuDNN


def test_b200_ranks_cudnn_above_fa4_and_fa2_but_packs_with_varlen() -> None:
    _, whole = _attention("b200")
    assert whole.choice == "sdpa_cudnn" and "sgl-project/sglang#33655" in whole.reason
    assert _rejected(whole)["flash_attention_4"].startswith(
        "supported; ranked below sdpa_cudnn on nvidia_sm100")
    _, packed = _attention("b200", packing=True)
    assert packed.choice == "flash_attention_4" and packed.details["packing_isolation"] == "varlen"
    assert "pytorch/pytorch#196678" in _rejected(packed)["sdpa_cudnn"]
    profile = profile_by_name("b200", "all").with_packages({"flash-attn", "triton"})
    _, fa2 = _attention("b200", packing=True, profile=profile)
    assert fa2.choice == "flash_attention_2" and "#1589" in fa2.reason


@pytest.mark.parametrize(("name", "why"), [("a100", "0.82x"), ("rtx5090", "0.88x")])
def test_cudnn_sdpa_ranks_below_sdpa_where_it_is_slower(name: str, why: str) -> None:
    _, attention = _attention(name, "none")
    assert attention.choice == "sdpa"
    reason = _rejected(attention)["sdpa_cudnn"]
    assert reason.startswith("supported; ranked below sdpa") and why in reason


def test_hopper_prefers_fa3_then_cudnn_for_whole_rows() -> None:
    assert _attention("h100")[1].choice == "flash_attention_3"
    without_fa3 = profile_by_name("h100", "all").with_packages({"flash-attn", "flash-attn-4"})
    assert _attention("h100", profile=without_fa3)[1].choice == "sdpa_cudnn"
    assert _attention("h100", profile=without_fa3, packing=True)[1].choice == "flash_attention_4"


def test_packed_rows_never_take_cudnn() -> None:
    kernel_plan, attention = _attention("h100", "none", packing=True, attention="sdpa")
    assert attention.choice == "sdpa" and kernel_plan.cudnn_sdpa == "unmasked_only"
    assert "packed rows with a dense block-diagonal [T, T] mask" in attention.reason
    assert "backend efficient" in attention.reason
    _, auto = _attention("h100", "none", packing=True)
    assert "pytorch/pytorch#196678" in auto.reason  # sdpa_cudnn, ranked above, refused
    with pytest.raises(KernelOverrideError, match="pytorch/pytorch#196678"):
        _attention("h100", "none", packing=True, attention="sdpa_cudnn")


def test_packing_defaults_to_off() -> None:
    kernel_plan = plan(profile_by_name("b200", "all"), KernelsConfig())
    assert kernel_plan.packing is False and kernel_plan.choice("attention") == "sdpa_cudnn"


def test_every_plan_names_an_attn_implementation_transformers_accepts() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from finetune.kernels.varlen_sdpa import register_varlen_sdpa
    from finetune.kernels.varlen_torch import register_varlen_attn

    register_varlen_sdpa()  # as finetune.models.load_model does before loading with them
    register_varlen_attn()
    accepted = set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | {"eager"}
    from finetune.hardware import PROFILE_NAMES

    for name in PROFILE_NAMES:
        for packages in ("all", "none"):
            for packing in (False, True):
                kernel_plan, _ = _attention(name, packages, packing=packing)
                assert kernel_plan.attn_implementation in accepted, (name, packages, packing)
    for candidate in ATTENTION:
        assert candidate.transformers_name in accepted


@pytest.mark.parametrize(("profile", "facts", "match"), [
    ("rtx5090", FACTS, "Hopper or datacenter Blackwell"),
    ("b200", ModelFacts(8, 8, 256), "head_dim <= 128"),
    ("a100", FACTS, "Hopper or datacenter Blackwell"),
])
def test_flash_attention_4_limits(profile: str, facts: ModelFacts, match: str) -> None:
    with pytest.raises(KernelOverrideError, match=match):
        _attention(profile, facts=facts, attention="flash_attention_4")


def test_flash_attention_4_needs_its_distribution_and_a_new_transformers() -> None:
    only_fa2 = profile_by_name("b200", "all").with_packages({"flash-attn"})
    with pytest.raises(KernelOverrideError, match="needs the flash-attn-4 package"):
        _attention("b200", profile=only_fa2, attention="flash_attention_4")
    old = replace(profile_by_name("b200", "all"), transformers="4.57.1")
    with pytest.raises(KernelOverrideError, match="needs transformers 5.0"):
        _attention("b200", profile=old, attention="flash_attention_4")
    only_fa4 = profile_by_name("b200", "all").with_packages({"flash-attn-4"})
    with pytest.raises(KernelOverrideError, match="needs the flash-attn package"):
        _attention("b200", profile=only_fa4, attention="flash_attention_2")


@pytest.mark.parametrize(("name", "build", "backend", "env"), [
    ("rx7900xtx", None, "Triton backend", True),  # no released CK backend for RDNA
    ("rx9070", "compiled", "Triton backend", True),
    ("mi300x", "compiled", "CK backend", False),
    ("mi300x", None, "CK backend", False),
    ("mi300x", "triton", "Triton backend", True),  # built without its extension
])
def test_amd_flash_attention_backend(name: str, build: str | None, backend: str,
                                     env: bool) -> None:
    profile = replace(profile_by_name(name, "all"), flash_attn_build=build)
    kernel_plan, attention = _attention(name, profile=profile)
    assert attention.choice == "flash_attention_2" and backend in attention.reason
    assert (kernel_plan.env.get("FLASH_ATTENTION_TRITON_AMD_ENABLE") == "TRUE") is env
    if env:
        assert "flash_attn_interface.py" in kernel_plan.env_reasons[
            "FLASH_ATTENTION_TRITON_AMD_ENABLE"]


def test_no_triton_flag_without_flash_attn() -> None:
    assert "FLASH_ATTENTION_TRITON_AMD_ENABLE" not in plan(profile_by_name("rx9070"),
                                                          KernelsConfig()).env


def test_aotriton_flag_on_every_amd_gpu_and_nowhere_else() -> None:
    from finetune.hardware import PROFILE_NAMES

    for name in PROFILE_NAMES:
        kernel_plan = plan(profile_by_name(name), KernelsConfig())
        flag = kernel_plan.env.get("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL")
        assert flag == ("1" if kernel_plan.hardware.vendor == "amd" else None), name
        if flag:
            assert "pytorch/pytorch#134498" in kernel_plan.env_reasons[
                "TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL"]


def test_xpu_sdpa_backends_by_torch_version() -> None:
    facts = ModelFacts(8, 4, 64, dtype="bf16")
    new = replace(profile_by_name("xpu-max1550"), torch="2.11.0")
    assert sdpa_backend(new, facts, masked=False)[0] == "flash"
    assert "intel/torch-xpu-ops#2232" in sdpa_backend(new, facts, masked=False)[1]
    masked = sdpa_backend(new, facts, masked=True)
    assert masked[0] == "math" and "intel/torch-xpu-ops#2390" in masked[1]
    old = sdpa_backend(profile_by_name("xpu-max1550"), facts, masked=False)
    assert old[0] == "math" and "intel/torch-xpu-ops#1749" in old[1]


def test_xpu_packs_with_flex_because_masked_sdpa_is_math() -> None:
    _, packed = _attention("xpu-max1550", packing=True)
    assert packed.choice == "flex_attention" and "#2390" in packed.reason
    assert _attention("xpu-max1550")[1].choice == "sdpa"
    # Without triton (a CPU-only torch pretending to be XPU) SDPA runs once per document.
    no_triton = profile_by_name("xpu-max1550").with_packages(set())
    _, packed = _attention("xpu-max1550", profile=no_triton, packing=True)
    assert packed.choice == "sdpa_varlen" and "needs triton" in packed.reason


def test_xccl_needs_torch_2_8() -> None:
    old = replace(profile_by_name("xpu-max1550"), torch="2.7.1")
    with pytest.raises(KernelOverrideError, match="torch 2.8"):
        plan(old, KernelsConfig(collective="xccl"))
    collective = plan(old, KernelsConfig()).kernels["collective"]
    assert collective.choice == "gloo" and "2.8+ (xccl)" in collective.reason
    assert plan(profile_by_name("xpu-max1550"), KernelsConfig()).collective == "xccl"


@pytest.fixture
def cpu_profile():
    profile = detect()
    if profile.vendor != "cpu":
        pytest.skip("forces a CPU self-check")
    return profile


def test_environment_is_in_place_before_the_first_selfcheck(cpu_profile, monkeypatch) -> None:
    """torch reads TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL once, at the first SDPA call: a
    self-check run before the plan's environment would freeze the wrong value."""
    name = "FINETUNE_TEST_PLAN_ENV"
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(planner_module, "attention_env",
                        lambda profile: {name: ("on", "needed before the first SDPA call")})
    seen: list[str | None] = []

    def forward(q, k, v, scale):
        seen.append(os.environ.get(name))
        return ATTENTION.get("sdpa").forward(q, k, v, scale)

    registries = default_registries()
    registries.attention.register(AttentionCandidate(
        "recording", lambda p, f: (True, "records the environment"), default_rank=-1,
        forward=forward, packing_isolation="block_mask_4d"))
    try:
        kernel_plan = plan(cpu_profile, KernelsConfig(), ModelFacts(8, 2, 16),
                           run_selfcheck=True, registries=registries)
        assert seen == ["on"]
        assert kernel_plan.choice("attention") == "recording"
        assert kernel_plan.env == {name: "on"}
    finally:
        os.environ.pop(name, None)


def test_simulated_and_unchecked_plans_touch_no_environment(cpu_profile) -> None:
    calls: list[dict] = []
    plan(profile_by_name("mi300x"), KernelsConfig(), prepare_env=calls.append)
    plan(cpu_profile, KernelsConfig(selfcheck=False), prepare_env=calls.append)
    assert calls == []
    plan(cpu_profile, KernelsConfig(), ModelFacts(8, 2, 16), prepare_env=calls.append)
    assert calls == [{}]
