"""A sharded (fsdp2) checkpoint gives back AdamW's moments, not only its weights: after loading,
each parameter's exp_avg and exp_avg_sq equal those saved, in either engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.checkpoint.trainable import trainable_state
from finetune.config.schema import PeftConfig
from finetune.distributed.engine import FullyShard, Replicated, _optimizer_by_name, save_shards
from tests.integration.distributed.conftest import CpuAccelerator

MOMENTS = ("exp_avg", "exp_avg_sq")


def _lora_model(tiny_model_dir: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from finetune.adapters import apply_adapter

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return apply_adapter(model, PeftConfig(r=4, alpha=8))


def _adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def _train_steps(model: torch.nn.Module, optimizer, steps: int) -> None:
    for step in range(steps):
        ids = torch.arange(2 + step, 34 + step).reshape(2, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _moments(model: torch.nn.Module, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {exp_avg, exp_avg_sq, step} as whole tensors."""
    by_name = _optimizer_by_name(optimizer.state_dict(), list(trainable_state(model)))
    return {name: {key: _full(torch.as_tensor(state[key])) for key in (*MOMENTS, "step")}
            for name, state in by_name["state"].items()}


@pytest.mark.parametrize("target", ["single", "fsdp2"])
def test_a_sharded_checkpoint_gives_back_the_optimizer_moments(
        tiny_model_dir: Path, tmp_path: Path, one_rank, target: str) -> None:
    engine = FullyShard()
    model, optimizer = engine.prepare(CpuAccelerator(), _lora_model(tiny_model_dir, 0), _adamw)
    _train_steps(model, optimizer, 2)
    saved = _moments(model, optimizer)
    assert saved and all(m["exp_avg_sq"].abs().sum() > 0 for m in saved.values())
    _, _, shards = engine.save_state(model, optimizer)
    save_shards(shards, tmp_path)

    loader = FullyShard() if target == "fsdp2" else Replicated("single")
    fresh, fresh_opt = loader.prepare(CpuAccelerator(), _lora_model(tiny_model_dir, 1), _adamw)
    _train_steps(fresh, fresh_opt, 1)  # moments of its own, which the load must replace
    loader.load_state(fresh, fresh_opt, tmp_path, {}, {})
    loaded = _moments(fresh, fresh_opt)
    assert set(loaded) == set(saved)
    for name, expected in saved.items():
        for key, value in expected.items():
            assert torch.equal(loaded[name][key], value), (name, key)
