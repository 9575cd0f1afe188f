"""build_optimizer constructs exactly the planned implementation."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import detect
from finetune.kernels import build_optimizer, plan


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize(
    ("choice", "fused", "foreach"),
    [("adamw_fused", True, False), ("adamw_foreach", False, True), ("adamw", False, False)],
)
def test_build_optimizer_flags(choice: str, fused: bool, foreach: bool) -> None:
    optimizer = build_optimizer(choice, _params(), lr=1e-3, betas=[0.9, 0.95], eps=1e-8,
                                weight_decay=0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert bool(optimizer.defaults["fused"]) is fused
    assert bool(optimizer.defaults["foreach"]) is foreach
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["weight_decay"] == 0.1


def test_planned_optimizer_on_this_machine_steps_like_torch_adamw() -> None:
    """What setup builds from the plan, with the run's hyper-parameters, takes the same steps
    as torch's reference AdamW (per-parameter loop) given them."""
    choice = plan(detect(), KernelsConfig(selfcheck=False)).choice("optimizer")
    hparams = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    torch.manual_seed(0)
    ours = _params()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    built = build_optimizer(choice, ours, lr=hparams["lr"], betas=list(hparams["betas"]),
                            eps=hparams["eps"], weight_decay=hparams["weight_decay"])
    torch_adamw = torch.optim.AdamW(reference, foreach=False, fused=False, **hparams)
    for step in range(3):
        grads = [torch.randn_like(p) * (step + 1) for p in ours]
        for params in (ours, reference):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        built.step()
        torch_adamw.step()
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got.detach(), want.detach())


def test_unknown_optimizer_name() -> None:
    with pytest.raises(KeyError, match="known: adamw_fused"):
        build_optimizer("sgd", _params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


def test_eight_bit_without_bitsandbytes_is_an_import_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError):
        build_optimizer("adamw_8bit", _params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed")
@pytest.mark.parametrize(("choice", "cls"), [("adamw_8bit", "AdamW8bit"),
                                             ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_eight_bit_choices_build_their_bitsandbytes_class(choice: str, cls: str) -> None:
    optimizer = build_optimizer(choice, _params(), lr=1e-3, betas=[0.9, 0.95], eps=1e-7,
                                weight_decay=0.1)
    assert type(optimizer).__name__ == cls
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-7, "weight_decay": 0.1}
