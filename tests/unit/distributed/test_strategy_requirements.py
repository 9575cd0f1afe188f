"""Sharding strategies refuse what cannot work, before any collective and with exit code 2:
QLoRA with parameter sharding, FSDP2 over mixed dtypes on torch < 2.8; and FSDP2 reads the
gradient norm without torch 2.6's get_total_norm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.config.distributed import Strategy
from finetune.config.schema import PeftMethod, RunConfig
from finetune.config.validate import validate_run_config
from finetune.distributed import requirements
from finetune.distributed.engine import FullyShard
from finetune.errors import ConfigError


def _run(strategy: Strategy, method: PeftMethod) -> RunConfig:
    run = RunConfig()
    run.distributed.strategy, run.peft.method = strategy, method
    return run


@pytest.mark.parametrize("strategy", [Strategy.fsdp2, Strategy.deepspeed_zero3])
def test_qlora_with_parameter_sharding_is_refused_at_config_time(strategy: Strategy) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_run_config(_run(strategy, PeftMethod.qlora))
    message = str(refused.value)
    assert refused.value.exit_code == 2
    assert f"peft=qlora cannot train with distributed={strategy}" in message
    assert "huggingface/accelerate#3983" in message and "distributed=ddp" in message


@pytest.mark.parametrize(("strategy", "method"), [
    (Strategy.ddp, PeftMethod.qlora), (Strategy.deepspeed_zero2, PeftMethod.qlora),
    (Strategy.auto, PeftMethod.qlora), (Strategy.fsdp2, PeftMethod.lora),
    (Strategy.deepspeed_zero3, PeftMethod.lora)])
def test_the_rest_is_accepted(strategy: Strategy, method: PeftMethod) -> None:
    validate_run_config(_run(strategy, method))


class _Model(torch.nn.Module):
    """A bf16 frozen base weight and an fp32 adapter weight, as a LoRA run under bf16 has."""

    def __init__(self, base: torch.dtype = torch.bfloat16, **attrs) -> None:
        super().__init__()
        self.base = torch.nn.Parameter(torch.zeros(4, 4, dtype=base), requires_grad=False)
        self.adapter = torch.nn.Parameter(torch.zeros(4, 2))
        for key, value in attrs.items():
            setattr(self, key, value)


def _prepare(model: torch.nn.Module) -> None:
    """FSDP2's prepare up to its first collective (the stub accelerator has none)."""
    FullyShard().prepare(SimpleNamespace(), model, make_optimizer=None)


def test_fsdp2_over_mixed_dtypes_needs_torch_2_8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requirements, "torch_version", lambda: "2.7.1")
    with pytest.raises(ConfigError) as refused:
        _prepare(_Model())
    message = str(refused.value)
    assert "distributed=fsdp2 with a bfloat16 base and float32 trainable weights" in message
    assert "torch 2.8+" in message and "pytorch/pytorch#154103" in message
    assert "this is torch 2.7.1" in message


def test_fsdp2_dtype_check_passes_on_torch_2_8_and_for_one_dtype(
        monkeypatch: pytest.MonkeyPatch) -> None:
    requirements.check_fsdp2_dtypes({torch.bfloat16}, {torch.float32}, version="2.8.0")
    requirements.check_fsdp2_dtypes({torch.float32}, {torch.float32}, version="2.7.1")
    monkeypatch.setattr(requirements, "torch_version", lambda: "2.7.1")
    with pytest.raises(AttributeError):  # past the check, at the stub's missing collective
        _prepare(_Model(base=torch.float32))


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3"])
def test_a_4bit_model_is_refused_when_a_strategy_shards_it(strategy: str) -> None:
    model = _Model(is_loaded_in_4bit=True)  # what distributed=auto may resolve to fsdp2 with
    with pytest.raises(ConfigError, match=f"peft=qlora cannot train with distributed={strategy}"):
        requirements.check_model_for_sharding(strategy, model)
    if strategy == "fsdp2":
        with pytest.raises(ConfigError, match="peft=qlora"):
            _prepare(model)
    requirements.check_model_for_sharding("deepspeed_zero2", model)


def test_fsdp2_gradient_norm_without_get_total_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.nn.utils.get_total_norm came with torch 2.6; the norm is the same without it and
    the gradients are left as they were."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    accelerator = SimpleNamespace(unscale_gradients=lambda: None)
    with_it = FullyShard().clip_grad_norm(accelerator, params, 0.0)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    assert FullyShard().clip_grad_norm(accelerator, params, 0.0) == with_it == 5.0
    assert params[0].grad.tolist() == [3.0, 0.0, 0.0] and params[1].grad.tolist() == [0.0, 4.0]
