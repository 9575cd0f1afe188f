"""DeepSpeed ZeRO engine: the DeepSpeed config a run gets (stage, precision, offload, fp32
gradient communication, merged overrides), the entries it refuses, the refusal without
DeepSpeed installed, and the engine's loop and checkpoint contracts against a stand-in for
DeepSpeed's engine (the real one runs in tests/e2e/test_deepspeed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.distributed import deepspeed as ds
from finetune.distributed.engine import build_engine
from finetune.errors import CheckpointError, ConfigError

RUN = {"micro_batch_size": 4, "grad_accum_steps": 2, "mixed_precision": "bf16",
       "max_grad_norm": 1.0}


def _config(strategy: str = "deepspeed_zero2", **kwargs) -> dict:
    return ds.build_config(strategy, **{**RUN, **kwargs})


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed counts as installed (the engine's own code needs none of it here)."""
    monkeypatch.setattr(ds, "deepspeed_available", lambda: True)


# ------------------------------------------------------------------ without DeepSpeed


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_without_deepspeed_the_strategy_is_refused_with_the_extra(
        strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        build_engine(strategy)
    assert err.value.exit_code == 2
    assert "pip install 'finetune[deepspeed]'" in str(err.value)
    assert "distributed=fsdp2" in str(err.value)


def test_deepspeed_availability_is_read_from_the_environment() -> None:
    import importlib.util

    assert ds.deepspeed_available() == (importlib.util.find_spec("deepspeed") is not None)


def test_other_strategies_never_ask_for_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "deepspeed_available", lambda: False)
    for strategy in ("single", "ddp", "fsdp2"):
        ds.require_deepspeed(strategy)


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize(("strategy", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_stage_batch_and_clipping_come_from_the_run(strategy: str, stage: int) -> None:
    config = _config(strategy)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0
    assert "train_batch_size" not in config  # DeepSpeed derives it with the world size


@pytest.mark.parametrize(("precision", "bf16", "fp16"),
                         [("bf16", True, False), ("fp16", False, True), ("no", False, False)])
def test_16_bit_mode_follows_the_plan(precision: str, bf16: bool, fp16: bool) -> None:
    config = _config(mixed_precision=precision)
    assert config["bf16"]["enabled"] is bf16
    assert config["fp16"]["enabled"] is fp16
    # bf16 steps with non-finite gradients are skipped, as fp16's are.
    assert config["bf16"].get("check_grad_overflow", False) is bf16


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_gradients_are_communicated_in_fp32_by_default(precision: str) -> None:
    assert _config(mixed_precision=precision)["communication_data_type"] == "fp32"


def test_bf16_communication_is_chosen_by_reduce_dtype_or_the_override() -> None:
    assert _config(reduce_dtype="bf16")["communication_data_type"] == "bf16"
    chosen = _config(overrides={"communication_data_type": "bf16"})
    assert chosen["communication_data_type"] == "bf16"


def test_cpu_offload_moves_the_optimizer_to_the_host() -> None:
    assert "offload_optimizer" not in _config()["zero_optimization"]
    offload = _config(cpu_offload=True, vendor="nvidia")["zero_optimization"]["offload_optimizer"]
    assert offload == {"device": "cpu", "pin_memory": True}


def test_overrides_merge_key_by_key_over_the_defaults() -> None:
    overrides = {"zero_optimization": {"reduce_bucket_size": 12345, "overlap_comm": False},
                 "bf16": {"immediate_grad_update": True}, "wall_clock_breakdown": True}
    config = _config(overrides=overrides)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345
    assert zero["overlap_comm"] is False
    assert zero["stage"] == 2 and zero["contiguous_gradients"] is True  # defaults kept
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True,
                              "immediate_grad_update": True}
    assert config["wall_clock_breakdown"] is True
    assert overrides["zero_optimization"] == {"reduce_bucket_size": 12345,
                                              "overlap_comm": False}  # not modified


def test_an_override_may_restate_the_strategys_stage() -> None:
    config = _config("deepspeed_zero3", overrides={"zero_optimization": {"stage": 3}})
    assert config["zero_optimization"]["stage"] == 3


# ------------------------------------------------------------------ refused entries


@pytest.mark.parametrize(("key", "names"), [
    ("train_micro_batch_size_per_gpu", "trainer.micro_batch_size"),
    ("gradient_accumulation_steps", "trainer.grad_accum_steps"),
    ("train_batch_size", "trainer.grad_accum_steps"),
    ("gradient_clipping", "trainer.max_grad_norm"),
    ("optimizer", "optim."),
    ("scheduler", "optim."),
])
def test_entries_another_setting_owns_are_refused(key: str, names: str) -> None:
    with pytest.raises(ConfigError, match=f"distributed.deepspeed.{key}") as err:
        _config(overrides={key: 1})
    assert names in str(err.value)


def test_another_stage_than_the_strategys_is_refused() -> None:
    with pytest.raises(ConfigError, match="distributed=deepspeed_zero3"):
        _config("deepspeed_zero2", overrides={"zero_optimization": {"stage": 3}})


def test_a_precision_against_the_plan_is_refused() -> None:
    with pytest.raises(ConfigError, match="kernels.precision"):
        _config(mixed_precision="bf16", overrides={"fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match="kernels.precision"):
        _config(mixed_precision="no", overrides={"bf16": {"enabled": True}})


def test_turning_off_the_gradient_norm_is_refused() -> None:
    with pytest.raises(ConfigError, match="compute_grad_norm"):
        _config(overrides={"zero_optimization": {"compute_grad_norm": False}})


def test_two_different_communication_dtypes_are_refused() -> None:
    with pytest.raises(ConfigError, match="set one of them"):
        _config(reduce_dtype="fp32", overrides={"communication_data_type": "bf16"})


@pytest.mark.parametrize("how", [{"reduce_dtype": "bf16"},
                                 {"overrides": {"communication_data_type": "bf16"}},
                                 {"overrides": {"communication_data_type": "fp16"}}])
def test_16_bit_communication_is_refused_on_amd(how: dict) -> None:
    with pytest.raises(ConfigError, match="ROCm") as err:
        _config(vendor="amd", **how)
    assert err.value.exit_code == 2
    assert _config(vendor="amd")["communication_data_type"] == "fp32"


def test_the_engine_refuses_bad_overrides_when_built(installed: None) -> None:
    with pytest.raises(ConfigError, match="trainer.max_grad_norm"):
        ds.DeepSpeedZero("deepspeed_zero2", overrides={"gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match="ROCm"):
        ds.DeepSpeedZero("deepspeed_zero3", vendor="amd",
                         overrides={"communication_data_type": "bf16"})


# ------------------------------------------------------------------ accelerate


def test_accelerator_kwargs_carry_the_run_config(installed: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = ds.DeepSpeedZero("deepspeed_zero3", overrides={"zero_optimization":
                                                            {"reduce_bucket_size": 777}})
    kwargs = engine.accelerator_kwargs(**RUN)
    # accelerate runs DeepSpeed only when not told to run on the CPU.
    assert kwargs["cpu"] is False
    assert kwargs["gradient_accumulation_steps"] == 2
    config = kwargs["deepspeed_plugin"].deepspeed_config
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["reduce_bucket_size"] == 777
    assert config["communication_data_type"] == "fp32"
    assert config["train_micro_batch_size_per_gpu"] == 4


def test_offload_is_dropped_on_a_cpu_only_machine(installed: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = ds.DeepSpeedZero("deepspeed_zero2", cpu_offload=True, vendor="cpu")
    engine.accelerator_kwargs(**RUN)
    assert "offload_optimizer" not in engine.config["zero_optimization"]


def test_without_a_launcher_the_run_is_refused(installed: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="--nproc"):
        ds.DeepSpeedZero("deepspeed_zero2").accelerator_kwargs(**RUN)


# ------------------------------------------------------------------ loop and checkpoints


class FakeEngine:
    """Stands for deepspeed.DeepSpeedEngine: records the calls the engine makes."""

    def __init__(self, module: torch.nn.Module, *, world_size: int = 2, norm=2.5,
                 clipping: float = 1.0) -> None:
        self.module, self.world_size, self.global_rank = module, world_size, 0
        self.norm, self.clipping = norm, clipping
        self.boundaries: list[bool] = []
        self.steps = 0
        self.loaded: list[str] = []

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        self.boundaries.append(value)

    def gradient_clipping(self) -> float:
        return self.clipping

    def step(self) -> None:
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm

    def save_checkpoint(self, path: str, **kwargs) -> None:
        Path(path, kwargs["tag"]).mkdir(parents=True)

    def load_checkpoint(self, path: str, **kwargs):
        self.loaded.append(path)
        return path, {}


def _lora_like() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return model


def _engine(installed: None, fake: FakeEngine) -> ds.DeepSpeedZero:
    engine = ds.DeepSpeedZero("deepspeed_zero2")
    engine._engine = fake
    return engine


def test_no_sync_marks_micro_batches_before_the_boundary(installed: None) -> None:
    fake = FakeEngine(_lora_like())
    engine = _engine(installed, fake)
    with engine.no_sync(None, fake)():
        assert fake.boundaries == [False]
    assert fake.boundaries == [False, True]
    with pytest.raises(RuntimeError), engine.no_sync(None, fake)():
        raise RuntimeError("a failed backward")
    assert fake.boundaries[-1] is True


def test_clipping_runs_deepspeeds_step_and_returns_its_norm(installed: None) -> None:
    fake = FakeEngine(_lora_like(), norm=torch.tensor(2.5))
    engine = _engine(installed, fake)
    assert engine.clip_grad_norm(None, [], 1.0) == 2.5
    assert fake.steps == 1
    fake.norm = float("inf")  # DeepSpeed skipped the step: the loop sees a non-finite norm
    assert engine.clip_grad_norm(None, [], 1.0) == float("inf")
    fake.norm = None
    assert torch.isnan(torch.tensor(engine.clip_grad_norm(None, [], 1.0)))
    with pytest.raises(ValueError, match="gradient_clipping"):
        engine.clip_grad_norm(None, [], 0.5)


def test_a_checkpoint_records_its_world_size_and_trainable_weights(installed: None,
                                                                   tmp_path: Path) -> None:
    model = _lora_like()
    engine = _engine(installed, FakeEngine(model))
    trainable, optimizer, shards = engine.save_state(model, None)
    assert (trainable, optimizer) == ({}, {})
    assert shards is not None  # the trainer writes shards through the engine
    engine.save_shards(shards, tmp_path)
    layout = json.loads((tmp_path / "deepspeed" / ds.LAYOUT).read_text())
    assert layout["world_size"] == 2
    assert layout["trainable"] == {"0.bias": [4], "1.weight": [2, 4], "1.bias": [2]}


def test_resume_loads_the_deepspeed_folder(installed: None, tmp_path: Path) -> None:
    model = _lora_like()
    fake = FakeEngine(model)
    engine = _engine(installed, fake)
    engine.save_shards({}, tmp_path)
    engine.load_state(model, None, tmp_path, {}, {})
    assert fake.loaded == [str(tmp_path / "deepspeed")]


def test_resume_on_another_world_size_is_refused(installed: None, tmp_path: Path) -> None:
    model = _lora_like()
    _engine(installed, FakeEngine(model, world_size=2)).save_shards({}, tmp_path)
    fake = FakeEngine(model, world_size=4)
    with pytest.raises(CheckpointError, match="--nproc 2"):
        _engine(installed, fake).load_state(model, None, tmp_path, {}, {})
    assert fake.loaded == []


def test_resume_with_another_adapter_shape_is_refused(installed: None, tmp_path: Path) -> None:
    _engine(installed, FakeEngine(_lora_like())).save_shards({}, tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    wider[0].weight.requires_grad_(False)
    fake = FakeEngine(wider)
    with pytest.raises(CheckpointError, match="shape differs"):
        _engine(installed, fake).load_state(wider, None, tmp_path, {}, {})
    assert fake.loaded == []


def test_resume_from_another_strategys_checkpoint_is_refused(installed: None,
                                                             tmp_path: Path) -> None:
    model = _lora_like()
    (tmp_path / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="another strategy"):
        _engine(installed, FakeEngine(model)).load_state(model, None, tmp_path, {}, {})
