"""The plan's loss head: Liger's fused loss where it runs and passes its self-check, else the
chunked plain-torch one, with the reason recorded; explicit settings are honoured."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import KernelOverrideError, default_registries, format_plan_table, plan
from finetune.kernels.fused_ops import FUSED_OPS
from finetune.kernels.loss_head import LOSS_HEAD, LossHeadCandidate, unfused_loss
from finetune.kernels.selfcheck import check_loss_head

FLCE = "fused_linear_cross_entropy"



def _drops_the_last_chunk(hidden, weight, bias, targets, ignore_index):
    keep = hidden.shape[0] - 16
    return unfused_loss(hidden[:keep], weight, bias, targets[:keep], ignore_index)


def _raises(*args):
    raise RuntimeError("triton: no kernel image for this device")


@pytest.mark.parametrize("name", ["cpu", "mps"])
def test_where_liger_cannot_run_the_plan_takes_the_chunked_loss_and_says_why(name) -> None:
    kernel_plan = plan(profile_by_name(name, "all"), KernelsConfig())
    details = kernel_plan.kernels["fused_ops"].to_dict()
    assert kernel_plan.loss_head == "chunked"
    assert "liger: needs CUDA, ROCm or XPU" in details["loss_head_reason"]
    assert FLCE not in kernel_plan.fused_ops
    assert "loss head chunked" in format_plan_table(kernel_plan)


def test_on_an_h100_with_liger_installed_the_plan_keeps_liger() -> None:
    kernel_plan = plan(profile_by_name("h100", "all"), KernelsConfig())
    assert kernel_plan.loss_head == "liger"
    assert FLCE in kernel_plan.fused_ops
    rejected = {r["name"]: r["reason"]
                for r in kernel_plan.kernels["fused_ops"].details["loss_head_rejected"]}
    assert "ranked below liger" in rejected["chunked"]


def test_without_liger_installed_an_h100_takes_the_chunked_loss() -> None:
    kernel_plan = plan(profile_by_name("h100"), KernelsConfig())
    assert kernel_plan.loss_head == "chunked"
    assert "liger-kernel" in kernel_plan.kernels["fused_ops"].details["loss_head_reason"]


def test_without_the_liger_ops_an_h100_never_takes_ligers_loss_and_on_is_refused() -> None:
    # Liger's loss is patched in with the Liger ops: with kernels.fused_ops=none it cannot run,
    # though the device and the installed package would allow it.
    h100 = profile_by_name("h100", "all")
    kernel_plan = plan(h100, KernelsConfig(fused_ops="none"))
    assert kernel_plan.loss_head == "chunked"
    rejected = {r["name"]: r["reason"]
                for r in kernel_plan.kernels["fused_ops"].details["loss_head_rejected"]}
    assert rejected["liger"] == "needs kernels.fused_ops=liger (it is none)"
    with pytest.raises(KernelOverrideError, match="needs kernels.fused_ops=liger"):
        plan(h100, KernelsConfig(fused_ops="none", fused_linear_cross_entropy="on"))

def test_where_liger_is_slow_auto_takes_the_chunked_loss_and_on_still_forces_liger() -> None:
    mi355x = profile_by_name("mi355x", "all")
    assert plan(mi355x, KernelsConfig()).loss_head == "chunked"
    assert plan(mi355x, KernelsConfig(fused_linear_cross_entropy="on")).loss_head == "liger"


@pytest.mark.parametrize(("setting", "want"), [("off", "unfused"), ("chunked", "chunked")])
def test_explicit_settings_are_honoured(setting: str, want: str) -> None:
    kernel_plan = plan(profile_by_name("h100", "all"),
                       KernelsConfig(fused_linear_cross_entropy=setting))
    assert kernel_plan.loss_head == want
    assert FLCE not in kernel_plan.fused_ops
    reason = kernel_plan.kernels["fused_ops"].details["loss_head_reason"]
    assert f"kernels.fused_linear_cross_entropy={setting}" in reason


def _liger_everywhere(loss) -> object:
    """Registries in which Liger runs on this CPU, its fused loss being `loss`."""
    registries = default_registries()
    liger_ops = FUSED_OPS.get("liger")
    registries.fused_ops.register(
        dataclasses.replace(liger_ops, supports=lambda p, f: (True, "pretend Triton runs")),
        replace=True)
    liger_loss = LOSS_HEAD.get("liger")
    registries.loss_head.register(
        dataclasses.replace(liger_loss, supports=lambda p, f: (True, "pretend Triton runs"),
                            loss=loss),
        replace=True)
    return registries


@pytest.mark.parametrize("loss", [_drops_the_last_chunk, _raises])
def test_liger_failing_its_self_check_falls_back_to_chunked(cpu_profile, loss) -> None:
    kernel_plan = plan(cpu_profile, KernelsConfig(), run_selfcheck=True,
                       registries=_liger_everywhere(loss))
    details = kernel_plan.kernels["fused_ops"].details
    assert kernel_plan.choice("fused_ops") == "liger"
    assert kernel_plan.loss_head == "chunked"
    assert details["loss_head_selfcheck"].startswith("failed: liger")
    assert details["loss_head_selfcheck"].endswith("-> fell back to chunked")
    assert FLCE not in kernel_plan.fused_ops


def test_liger_passing_its_self_check_is_kept(cpu_profile) -> None:
    kernel_plan = plan(cpu_profile, KernelsConfig(), run_selfcheck=True,
                       registries=_liger_everywhere(unfused_loss))
    assert kernel_plan.loss_head == "liger"
    assert kernel_plan.kernels["fused_ops"].details["loss_head_selfcheck"] == "passed"
    assert FLCE in kernel_plan.fused_ops


def test_a_broken_chunked_loss_falls_back_to_unfused_and_cannot_be_forced(cpu_profile) -> None:
    registries = default_registries()
    registries.loss_head.register(
        dataclasses.replace(LOSS_HEAD.get("chunked"), loss=_drops_the_last_chunk), replace=True)
    kernel_plan = plan(cpu_profile, KernelsConfig(), run_selfcheck=True, registries=registries)
    assert kernel_plan.loss_head == "unfused"
    assert kernel_plan.kernels["fused_ops"].details["loss_head_selfcheck"].startswith(
        "failed: chunked loss max relative error")
    with pytest.raises(KernelOverrideError, match="fused_linear_cross_entropy=chunked"):
        plan(cpu_profile, KernelsConfig(fused_linear_cross_entropy="chunked"),
             run_selfcheck=True, registries=registries)


def test_the_real_plan_here_passes_the_chunked_self_check(cpu_profile) -> None:
    details = plan(cpu_profile, KernelsConfig()).kernels["fused_ops"].details
    assert details["loss_head"] == "chunked"
    assert details["loss_head_selfcheck"] == "passed"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_self_check_passes_the_chunked_loss_and_catches_a_wrong_one(dtype: str) -> None:
    assert check_loss_head(LOSS_HEAD.get("chunked"), "cpu", dtype) is None
    broken = LossHeadCandidate("broken", LOSS_HEAD.get("chunked").supports,
                               loss=_drops_the_last_chunk)
    assert "max relative error" in check_loss_head(broken, "cpu", dtype)
    no_grad = LossHeadCandidate("detached", LOSS_HEAD.get("chunked").supports,
                                loss=lambda h, w, b, t, i: unfused_loss(h.detach(), w, b, t, i))
    assert "produced no grad of the hidden states" in check_loss_head(no_grad, "cpu", dtype)
    assert torch.is_grad_enabled()
