"""Each CPU attention path forced and compared with the reference; broken kernels are caught."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from finetune.config.kernels import KernelsConfig
from finetune.hardware import detect, profile_by_name
from finetune.kernels import (
    AttentionCandidate,
    KernelOverrideError,
    ModelFacts,
    OptimizerCandidate,
    default_registries,
    plan,
)
from finetune.kernels.attention import ATTENTION, sdpa_backend
from finetune.kernels.optimizer import OPTIMIZER
from finetune.kernels.selfcheck import check_attention, check_optimizer

FACTS = ModelFacts(num_heads=8, num_kv_heads=2, head_dim=16)



@pytest.mark.parametrize("name", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_attention_paths_match_reference(name: str, dtype: str) -> None:
    assert check_attention(ATTENTION.get(name), replace(FACTS, dtype=dtype), "cpu") is None


def test_cudnn_sdpa_selfcheck_runs_cudnn_only() -> None:
    """The sdpa_cudnn self-check may not pass through another SDPA backend: on CPU, where there
    is no cuDNN attention, it must fail (a fallback to the CPU flash kernel would pass)."""
    failure = check_attention(ATTENTION.get("sdpa_cudnn"), replace(FACTS, dtype="fp32"), "cpu")
    assert failure is not None and failure.startswith("sdpa_cudnn raised RuntimeError")


def test_selfcheck_at_other_lengths_catches_a_leak_past_the_default_length() -> None:
    def causal_only_up_to_64(q, k, v, scale):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
                                             v.repeat_interleave(4, 1), is_causal=True,
                                             scale=scale)
        if q.shape[-2] > 64:  # a kernel whose tiling breaks past 64 tokens
            out = out.clone()
            out[..., 64:, :] = out[..., 64:, :].flip(-2)
        return out

    broken = AttentionCandidate("tiled", lambda p, f: (True, ""), forward=causal_only_up_to_64)
    facts = replace(FACTS, dtype="fp32")
    assert check_attention(broken, facts, "cpu") is None
    assert "relative error" in (check_attention(broken, facts, "cpu", seq=130, batch=1) or "")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_matches_but_has_no_cpu_backward() -> None:
    flex = ATTENTION.get("flex_attention")
    facts = replace(FACTS, dtype="fp32")
    assert check_attention(flex, facts, "cpu", backward=False) is None
    failure = check_attention(flex, facts, "cpu")
    assert failure is not None and "backward" in failure


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_forced_attention_is_used_and_self_checked(cpu_profile, name: str) -> None:
    kernel_plan = plan(cpu_profile, KernelsConfig(attention=name), FACTS, run_selfcheck=True)
    attention = kernel_plan.kernels["attention"]
    assert attention.choice == name
    assert attention.details["selfcheck"] == "passed"
    assert f"set by kernels.attention={name}" in attention.reason


def test_flex_attention_cannot_be_forced_for_training_on_cpu(cpu_profile) -> None:
    with pytest.raises(KernelOverrideError, match="no backward on cpu"):
        plan(cpu_profile, KernelsConfig(attention="flex_attention"), FACTS)


def _non_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale)


def _raises(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


def _registries_with(forward) -> object:
    registries = default_registries()
    registries.attention.register(
        AttentionCandidate("broken", lambda p, f: (True, "claims to work everywhere"),
                           default_rank=-1, forward=forward, packing_isolation="varlen")
    )
    return registries


@pytest.mark.parametrize(("forward", "why"), [(_non_causal, "relative error"),
                                              (_raises, "RuntimeError")])
def test_broken_candidate_is_caught_and_fallback_recorded(cpu_profile, forward, why) -> None:
    registries = _registries_with(forward)
    kernel_plan = plan(cpu_profile, KernelsConfig(), FACTS, run_selfcheck=True,
                       registries=registries)
    attention = kernel_plan.kernels["attention"]
    assert attention.choice == "sdpa_varlen"
    status = attention.details["selfcheck"]
    assert status.startswith("failed: broken") and status.endswith("-> fell back to sdpa_varlen")
    assert why in status
    rejected = {r.name: r.reason for r in attention.rejected}
    assert rejected["broken"].startswith("self-check failed")


def test_without_selfcheck_the_broken_candidate_would_win(cpu_profile) -> None:
    registries = _registries_with(_non_causal)
    kernel_plan = plan(cpu_profile, KernelsConfig(selfcheck=False), FACTS, registries=registries)
    assert kernel_plan.choice("attention") == "broken"
    assert kernel_plan.kernels["attention"].details["selfcheck"] == (
        "skipped (kernels.selfcheck=false)"
    )


def test_forcing_a_broken_candidate_is_an_error_not_a_fallback(cpu_profile) -> None:
    registries = _registries_with(_non_causal)
    with pytest.raises(KernelOverrideError, match="failed its self-check"):
        plan(cpu_profile, KernelsConfig(attention="broken"), FACTS, run_selfcheck=True,
             registries=registries)


def test_simulated_profiles_are_never_self_checked() -> None:
    registries = _registries_with(_raises)
    kernel_plan = plan(profile_by_name("cpu"), KernelsConfig(), FACTS, run_selfcheck=True,
                       registries=registries)
    assert kernel_plan.kernels["attention"].details["selfcheck"] == "not run (simulated profile)"


def test_broken_optimizer_is_caught_and_falls_back(cpu_profile) -> None:
    def too_fast(params, **hp):
        return torch.optim.AdamW(params, **{**hp, "lr": hp["lr"] * 10})

    assert check_optimizer(OPTIMIZER.get("adamw_fused"), "cpu") is None
    broken = OptimizerCandidate("broken_adamw", lambda p, f: (True, "fast"), default_rank=-1,
                                build=too_fast)
    assert "differs from torch AdamW" in (check_optimizer(broken, "cpu") or "")
    registries = default_registries()
    registries.optimizer.register(broken)
    optimizer = plan(cpu_profile, KernelsConfig(), FACTS, run_selfcheck=True,
                     registries=registries).kernels["optimizer"]
    assert optimizer.choice == "adamw_fused"
    assert optimizer.details["selfcheck"].startswith("failed: broken_adamw")


def test_real_plan_on_this_machine_passes_its_selfcheck() -> None:
    kernel_plan = plan(detect(), KernelsConfig(), FACTS)
    assert kernel_plan.kernels["attention"].details["selfcheck"] == "passed"
    assert kernel_plan.kernels["optimizer"].details["selfcheck"] == "passed"


def test_sdpa_backend_math_on_arch_without_aotriton() -> None:
    from finetune.hardware.detect import GIB, profile_from_device_properties
    from finetune.hardware.profile import DeviceProperties

    rdna2 = profile_from_device_properties(
        DeviceProperties(True, "AMD Radeon RX 6900 XT", "gfx1030", 10, 3, 16 * GIB, 80, False,
                         "x86_64"),
        device_count=1, runtime_version="6.4", torch_version="2.10.0",
    )
    kernel_plan = plan(rdna2, KernelsConfig())
    attention = kernel_plan.kernels["attention"]
    assert attention.details["sdpa_backend"] == "math"
    assert "MATH" in attention.reason
    assert kernel_plan.choice("precision") == "fp16"  # gfx1030 has no native bf16 here


def test_sdpa_with_a_mask_avoids_flash() -> None:
    facts = ModelFacts(8, 4, 64, dtype="bf16")
    assert sdpa_backend(profile_by_name("a100"), facts, masked=False)[0] == "flash"
    assert sdpa_backend(profile_by_name("a100"), facts, masked=True)[0] == "efficient"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_gpu_plan_passes_selfcheck() -> None:
    kernel_plan = plan(detect(), KernelsConfig(), ModelFacts(32, 8, 64))
    assert kernel_plan.kernels["attention"].details["selfcheck"] == "passed"
    assert kernel_plan.kernels["optimizer"].details["selfcheck"] == "passed"


def test_auto_never_tries_a_candidate_kept_for_asking_by_name(cpu_profile) -> None:
    """A candidate with auto=False (used only when asked for by name) is neither chosen nor even
    self-checked by kernels.attention=auto, however high it ranks; the plan says why."""
    tried: list[int] = []

    def records_the_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> torch.Tensor:
        tried.append(1)
        raise RuntimeError("an auto plan must not try this candidate")

    registries = default_registries()
    registries.attention.register(
        AttentionCandidate("by_name_only", lambda p, f: (True, "works here"), default_rank=-1,
                           forward=records_the_call, packing_isolation="varlen", auto=False,
                           not_auto_reason="used only when asked for by name"))
    attention = plan(cpu_profile, KernelsConfig(), FACTS, run_selfcheck=True,
                     registries=registries).kernels["attention"]
    assert attention.choice == "sdpa_varlen" and tried == []
    assert attention.details["selfcheck"] == "passed"
    rejected = {r.name: r.reason for r in attention.rejected}
    assert rejected["by_name_only"] == "supported; used only when asked for by name"
