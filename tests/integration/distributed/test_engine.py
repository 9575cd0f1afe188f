"""The engines in-process, on one rank: fsdp2 wrapping, sharded checkpoints written with
torch.distributed.checkpoint and read back by either engine, and the refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from finetune.checkpoint.trainable import trainable_state
from finetune.config.schema import PeftConfig
from finetune.distributed.engine import (
    FullyShard,
    Replicated,
    _optimizer_by_name,
    build_engine,
    decoder_layers,
    save_shards,
)
from finetune.errors import CheckpointError, ConfigError
from tests.integration.distributed.conftest import CpuAccelerator


def _lora_model(tiny_model_dir: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from finetune.adapters import apply_adapter

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return apply_adapter(model, PeftConfig())


def _adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def _train_step(model: torch.nn.Module, optimizer, engine) -> float:
    ids = torch.arange(2, 34).reshape(2, 16)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = engine.clip_grad_norm(CpuAccelerator(), list(trainable_state(model).values()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_optimizer_state_keyed_by_parameter_name() -> None:
    param_a, param_b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param_a, param_b], lr=0.1)
    (param_a.sum() + 2 * param_b.sum()).backward()
    optimizer.step()
    by_name = _optimizer_by_name(optimizer.state_dict(), ["a.weight", "b.weight"])
    assert set(by_name["state"]) == {"a.weight", "b.weight"}
    assert by_name["state"]["b.weight"]["exp_avg"].shape == (3,)
    assert by_name["param_groups"][0]["params"] == ["a.weight", "b.weight"]
    assert by_name["param_groups"][0]["lr"] == 0.1


def test_decoder_layers_are_the_models_repeated_blocks(tiny_model_dir: Path) -> None:
    model = _lora_model(tiny_model_dir)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert {type(layer).__name__ for layer in layers} == {"LlamaDecoderLayer"}


def test_build_engine_refusals() -> None:
    assert isinstance(build_engine("single"), Replicated)
    assert build_engine("fsdp2").sharded
    with pytest.raises(ConfigError, match="NaN report on ROCm"):
        build_engine("fsdp2", reduce_dtype="bf16", vendor="amd")
    with pytest.raises(ConfigError, match="auto, fp32 or bf16"):
        build_engine("fsdp2", reduce_dtype="fp16")
    with pytest.raises(ConfigError, match="on the CPU"):
        build_engine("fsdp2", cpu_offload=True, vendor="cpu")


def test_fsdp2_shards_and_trains_like_the_plain_model(tiny_model_dir: Path, one_rank) -> None:
    plain = _lora_model(tiny_model_dir)
    replicated = Replicated("single")
    plain, plain_opt = replicated.prepare(CpuAccelerator(), plain, _adamw)
    sharded_engine = FullyShard()
    sharded, sharded_opt = sharded_engine.prepare(CpuAccelerator(), _lora_model(tiny_model_dir),
                                                  _adamw)
    assert type(sharded).__name__.startswith("FSDP")
    for _ in range(2):
        norm_plain = _train_step(plain, plain_opt, replicated)
        norm_sharded = _train_step(sharded, sharded_opt, sharded_engine)
        assert norm_sharded == pytest.approx(norm_plain, rel=1e-5)
    for name, value in trainable_state(plain).items():
        torch.testing.assert_close(_full(trainable_state(sharded)[name]).detach(),
                                   value.detach(), rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_loads_into_either_engine(tiny_model_dir: Path, tmp_path: Path,
                                                     one_rank) -> None:
    engine = FullyShard()
    model, optimizer = engine.prepare(CpuAccelerator(), _lora_model(tiny_model_dir), _adamw)
    _train_step(model, optimizer, engine)
    trainable, optim_state, shards = engine.save_state(model, optimizer)
    assert trainable == {} and optim_state == {} and shards is not None
    save_shards(shards, tmp_path)
    assert list((tmp_path / "sharded").glob("*.distcp"))
    saved = {n: _full(p).detach().clone() for n, p in trainable_state(model).items()}
    steps = {n: s["step"] for n, s in optimizer.state_dict()["state"].items()}

    # A plain model (another seed: other adapter weights) takes the shards' weights and state.
    replicated = Replicated("single")
    plain, plain_opt = replicated.prepare(CpuAccelerator(), _lora_model(tiny_model_dir, seed=1),
                                          _adamw)
    replicated.load_state(plain, plain_opt, tmp_path, {}, {})
    for name, value in trainable_state(plain).items():
        assert torch.equal(value.detach(), saved[name]), name
    assert all(float(s["step"]) == 1.0 for s in plain_opt.state_dict()["state"].values())

    # And a sharded one.
    other = FullyShard()
    again, again_opt = other.prepare(CpuAccelerator(), _lora_model(tiny_model_dir, seed=2), _adamw)
    other.load_state(again, again_opt, tmp_path, {}, {})
    for name, value in trainable_state(again).items():
        assert torch.equal(_full(value).detach(), saved[name]), name
    assert len(steps) == len(again_opt.state_dict()["state"])


def test_replicated_checkpoint_loads_into_fsdp2(tiny_model_dir: Path, one_rank) -> None:
    replicated = Replicated("single")
    plain, plain_opt = replicated.prepare(CpuAccelerator(), _lora_model(tiny_model_dir), _adamw)
    _train_step(plain, plain_opt, replicated)
    trainable, optim_state, _ = replicated.save_state(plain, plain_opt)
    trainable = {n: t.detach().clone() for n, t in trainable.items()}

    engine = FullyShard()
    model, optimizer = engine.prepare(CpuAccelerator(), _lora_model(tiny_model_dir, seed=3), _adamw)
    # Copies: loading distributes the given tensors in place (a checkpoint's come from disk).
    engine.load_state(model, optimizer, Path("ckpt"), dict(trainable), copy.deepcopy(optim_state))
    for name, value in trainable_state(model).items():
        assert torch.equal(_full(value).detach(), trainable[name]), name
    # Both continue identically: the optimizer state came across too.
    _train_step(plain, plain_opt, replicated)
    _train_step(model, optimizer, engine)
    for name, value in trainable_state(plain).items():
        torch.testing.assert_close(_full(trainable_state(model)[name]).detach(), value.detach(),
                                   rtol=1e-5, atol=1e-6)

    with pytest.raises(CheckpointError, match="another model or adapter shape"):
        engine.load_state(model, optimizer, Path("ckpt"), {"other.weight": torch.zeros(1)},
                          copy.deepcopy(optim_state))
