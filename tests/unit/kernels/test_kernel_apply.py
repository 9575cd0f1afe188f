"""apply: the plan's env vars and torch globals, and Liger patches from the op names alone."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import apply, apply_env, apply_fused_ops, plan, route_sdpa


@pytest.fixture
def matmul_precision_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    return calls


def test_apply_env_sets_variables_and_keeps_user_values(monkeypatch, matmul_precision_calls) -> None:
    kernel_plan = plan(profile_by_name("mi300x"), KernelsConfig())
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


def test_gfx950_never_gets_tf32(monkeypatch, matmul_precision_calls) -> None:
    """gfx950 emulates TF32 with bf16 in hipBLASLt, with an open wrong-result report: the plan
    turns it off in hipBLASLt and in torch, and says why."""
    kernel_plan = plan(profile_by_name("mi355x", "all"), KernelsConfig())
    assert kernel_plan.tf32 is False
    assert "ROCm/hipBLASLt#1806" in kernel_plan.kernels["precision"].details["tf32_reason"]
    assert kernel_plan.env["HIPBLASLT_ALLOW_TF32"] == "0"
    assert "rocm-libraries#12226" in kernel_plan.env_reasons["HIPBLASLT_ALLOW_TF32"]
    monkeypatch.delenv("HIPBLASLT_ALLOW_TF32", raising=False)
    apply_env(kernel_plan)
    assert matmul_precision_calls == ["highest"]
    assert os.environ["HIPBLASLT_ALLOW_TF32"] == "0"


@pytest.mark.parametrize(("name", "packages", "routing"), [
    ("h100", "none", "first"),  # sdpa_cudnn
    ("a100", "none", None),  # plain sdpa where torch never picks cuDNN
    ("cpu", "none", None),
])
def test_apply_env_routes_sdpa_as_planned(monkeypatch, matmul_precision_calls, name: str,
                                          packages: str, routing: str | None) -> None:
    calls: list[str | None] = []
    monkeypatch.setattr(apply, "route_sdpa", calls.append)
    kernel_plan = plan(profile_by_name(name, packages), KernelsConfig())
    assert kernel_plan.cudnn_sdpa == routing
    apply_env(kernel_plan)
    assert calls == [routing]


def test_packed_sdpa_on_hopper_keeps_masked_calls_off_cudnn() -> None:
    kernel_plan = plan(profile_by_name("h100"), KernelsConfig(attention="sdpa"), packing=True)
    attention = kernel_plan.kernels["attention"]
    assert (attention.choice, kernel_plan.cudnn_sdpa) == ("sdpa", "unmasked_only")
    assert attention.details["sdpa_backend_masked"] == "efficient"


@pytest.fixture
def sdpa_probe(monkeypatch) -> list[dict]:
    """Replace transformers' sdpa function by one that records the SDPA backend state it runs
    under (the process-wide flags torch.nn.attention.sdpa_kernel sets)."""
    from transformers.modeling_utils import AttentionInterface

    seen: list[dict] = []

    def probe(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append({"masked": attention_mask is not None,
                     "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                     "flash": torch.backends.cuda.flash_sdp_enabled(),
                     "first": torch._C._get_sdp_priority_order()[0]})
        return "out"

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", probe)
    return seen


def _call_sdpa(mask: object) -> object:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](None, "q", "k", "v", mask, scaling=1.0)


def test_route_sdpa_first_puts_cudnn_first_only_without_a_mask(sdpa_probe) -> None:
    from torch.nn.attention import SDPBackend

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())
    assert route_sdpa("first") is True
    assert route_sdpa("first") is True  # idempotent: wraps the original, not the wrapper
    assert _call_sdpa(None) == "out" and _call_sdpa("a 4D mask") == "out"
    unmasked, masked = sdpa_probe
    assert unmasked["cudnn"] and unmasked["first"] == int(SDPBackend.CUDNN_ATTENTION)
    assert not masked["cudnn"] and masked["flash"]  # pytorch/pytorch#196678
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


def test_route_sdpa_unmasked_only_leaves_unmasked_calls_alone(sdpa_probe) -> None:
    order = torch._C._get_sdp_priority_order()
    assert route_sdpa("unmasked_only") is True
    _call_sdpa(None)
    _call_sdpa("a 4D mask")
    unmasked, masked = sdpa_probe
    assert unmasked["cudnn"] and unmasked["first"] == order[0]
    assert not masked["cudnn"]


def test_route_sdpa_none_puts_back_transformers_function(sdpa_probe) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    probe = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert route_sdpa(None) is False
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is probe
    route_sdpa("first")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not probe
    assert route_sdpa(None) is False
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is probe
    with pytest.raises(ValueError, match="unknown cuDNN SDPA routing"):
        route_sdpa("always")


def test_routed_sdpa_gives_the_same_attention(monkeypatch) -> None:
    """The routing only picks backends: a masked and an unmasked call through the routed
    function equal transformers' own function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 16, 8, generator=gen)
    k, v = torch.randn(1, 2, 16, 8, generator=gen), torch.randn(1, 2, 16, 8, generator=gen)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    want = [sdpa_attention_forward(module, q, k, v, m, scaling=0.3)[0] for m in (None, mask)]
    route_sdpa("first")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    got = [ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, m, scaling=0.3)[0]
           for m in (None, mask)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


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
