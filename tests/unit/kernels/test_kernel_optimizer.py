"""build_optimizer constructs exactly the planned implementation."""

from __future__ import annotations

import importlib.util

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


def test_planned_optimizer_on_this_machine_is_built_and_steps() -> None:
    choice = plan(detect(), KernelsConfig(selfcheck=False)).choice("optimizer")
    params = _params()
    optimizer = build_optimizer(choice, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)
    if choice == "adamw_fused":
        assert optimizer.defaults["fused"] is True
    before = params[0].detach().clone()
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones_like(params[1])
    optimizer.step()
    assert not torch.equal(before, params[0].detach())


def test_unknown_optimizer_name() -> None:
    with pytest.raises(KeyError, match="known: adamw_fused"):
        build_optimizer("sgd", _params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed")
def test_eight_bit_without_bitsandbytes_is_an_import_error() -> None:
    with pytest.raises(ImportError):
        build_optimizer("adamw_8bit", _params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                        weight_decay=0)
