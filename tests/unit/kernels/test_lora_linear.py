"""The fused LoRA forward (`kernels.lora=fused`) against peft's own, and where it steps aside.

The fused path must give peft's outputs and gradients (it only reorders one sum), must really
run where it claims to (peft's forward is made to fail there), and must hand every case it does
not cover back to peft: DoRA, a LoRA bias, disabled or merged adapters, per-call adapter names,
a DeepSpeed ZeRO-3 placeholder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from finetune.config.kernels import KernelsConfig
from finetune.hardware import PROFILE_NAMES, profile_by_name
from finetune.kernels import apply_lora_kernel, check_choices, plan
from finetune.kernels.lora_linear import fuse_lora_layers, fused_lora_class
from finetune.kernels.registry import KernelOverrideError


class _Block(torch.nn.Module):
    """Two projections sharing an input (as q/k/v do), one with a bias, and one after them."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 20)
        self.gate = torch.nn.Linear(12, 20, bias=False)
        self.down = torch.nn.Linear(20, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _adapted(*, dropout: float = 0.0, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Block(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "gate", "down"], **config))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide the adapter's path
            torch.nn.init.normal_(param, std=0.5)
    return model


def _pair(**config) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference, fused = _adapted(**config), _adapted(**config)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _forbid_peft_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self, *args, **kwargs):
        raise AssertionError("peft's LoRA forward ran where the fused one should have")

    monkeypatch.setattr(PeftLoraLinear, "forward", fail)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_forward_gives_peft_outputs_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, fused = _pair()
    assert fuse_lora_layers(fused) == (3, 0)
    x = torch.randn(3, 7, 12)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = reference(x_ref)
    expected.square().sum().backward()
    _forbid_peft_forward(monkeypatch)
    got = fused(x_fused)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    ref_grads, fused_grads = _grads(reference), _grads(fused)
    assert set(ref_grads) == set(fused_grads) and len(ref_grads) == 6
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5)
    # The adapter is what the forward adds: without it the outputs differ.
    monkeypatch.undo()
    with reference.disable_adapter():
        assert not torch.allclose(reference(x), got.detach(), atol=1e-3)


def test_dropout_draws_the_same_mask_as_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, fused = _pair(dropout=0.5)
    fuse_lora_layers(fused)
    x = torch.randn(2, 5, 12)
    torch.manual_seed(3)
    expected = reference(x)
    _forbid_peft_forward(monkeypatch)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_matches_peft_within_bf16_rounding() -> None:
    reference, fused = _pair()
    for model in (reference, fused):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                module.to(torch.bfloat16)  # frozen base in bf16, adapters fp32: the bf16 plan
    fuse_lora_layers(fused)
    x = torch.randn(4, 6, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(x), fused(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    expected.float().square().sum().backward()
    got.float().square().sum().backward()
    for name, grad in _grads(reference).items():
        got_grad = _grads(fused)[name]
        assert got_grad.dtype == torch.float32
        assert (got_grad - grad).norm() <= 2e-2 * grad.norm(), name


def test_adapters_that_are_not_plain_lora_keep_peft_forward() -> None:
    assert fuse_lora_layers(_adapted(use_dora=True)) == (0, 3)
    assert fuse_lora_layers(_adapted(lora_bias=True)) == (0, 3)
    assert fuse_lora_layers(_Block()) == (0, 0)


def _count_peft_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch peft's LoRA forward to record each call (by the calling layer's class)."""
    calls: list[str] = []
    original = PeftLoraLinear.forward

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftLoraLinear, "forward", counted)
    return calls


@pytest.mark.parametrize("case", ["disabled", "merged", "zero3"])
def test_calls_it_does_not_cover_go_to_peft(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, fused = _pair()
    fuse_lora_layers(fused)
    x = torch.randn(2, 3, 12)
    if case == "merged":
        reference.merge_adapter()
        fused.merge_adapter()
    if case == "zero3":
        for module in fused.modules():
            if isinstance(module, PeftLoraLinear):
                module.lora_B["default"].weight.ds_id = 0
    with reference.disable_adapter() if case == "disabled" else torch.no_grad():
        expected = reference(x)
    calls = _count_peft_calls(monkeypatch)
    with fused.disable_adapter() if case == "disabled" else torch.no_grad():
        got = fused(x)
    assert calls == ["FusedLoraLinear"] * 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_per_call_adapter_names_go_to_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, fused = _pair()
    fuse_lora_layers(fused)
    x = torch.randn(2, 3, 12)
    names = ["default", "__base__"]  # one row with the adapter, one without
    expected = reference.base_model.model.up(x, adapter_names=names)
    calls = _count_peft_calls(monkeypatch)
    got = fused.base_model.model.up(x, adapter_names=names)
    assert calls == ["FusedLoraLinear"]
    torch.testing.assert_close(got, expected)


def test_state_dict_and_saved_adapter_are_peft_s(tmp_path: Path) -> None:
    reference, fused = _pair()
    keys = list(fused.state_dict())
    fuse_lora_layers(fused)
    assert list(fused.state_dict()) == keys
    assert all(type(m) is fused_lora_class() for m in fused.modules()
               if isinstance(m, PeftLoraLinear))
    reference.save_pretrained(tmp_path / "reference")
    fused.save_pretrained(tmp_path / "fused")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key


def test_apply_follows_the_plan_choice() -> None:
    model = _adapted()
    assert apply_lora_kernel(model, "peft") == 0
    assert not any(type(m) is fused_lora_class() for m in model.modules())
    assert apply_lora_kernel(model, "fused") == 3
    with pytest.raises(ValueError, match="unknown LoRA kernel 'fast'"):
        apply_lora_kernel(model, "fast")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_plan_picks_fused_everywhere_and_honours_peft(name: str) -> None:
    profile = profile_by_name(name)
    assert plan(profile, KernelsConfig()).lora == "fused"
    chosen = plan(profile, KernelsConfig(lora="peft"))
    assert chosen.lora == "peft"
    assert "set by kernels.lora=peft" in chosen.kernels["lora"].reason


def test_unknown_lora_choice_is_refused_before_any_work() -> None:
    with pytest.raises(KernelOverrideError, match=r"kernels.lora=fast .*known: fused, peft"):
        check_choices(KernelsConfig(lora="fast"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_llama_loss_and_gradients_match_peft(tiny_model_dir: Path,
                                                  checkpointing: bool) -> None:
    """The whole model: every projection of a Llama through the fused path, also when
    activation checkpointing recomputes the forward in backward."""
    from transformers import AutoModelForCausalLM

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        return model.train()  # checkpointing recomputes in training mode only

    reference, fused = build(), build()
    fused.load_state_dict(reference.state_dict())
    fused_layers, other = fuse_lora_layers(fused)
    assert fused_layers == 7 * fused.config.num_hidden_layers and other == 0
    ids = torch.randint(3, 200, (2, 24))
    losses = []
    for model in (reference, fused):
        calls: list[int] = []
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        hook = q_proj.register_forward_hook(lambda *_, found=calls: found.append(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(_grads(fused)[name], grad, rtol=1e-4, atol=1e-6)
