"""DeepSpeed ZeRO engine: the DeepSpeed config a run gets (stage, precision, offload, fp32
gradient communication, merged overrides), the entries it refuses, the refusal without
DeepSpeed installed, and the engine's loop and checkpoint contracts against a stand-in for
DeepSpeed's engine (the real one runs in tests/e2e/test_deepspeed.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.distributed import deepspeed as ds
from finetune.distributed import deepspeed_config as dsc
from finetune.distributed.engine import build_engine
from finetune.errors import CheckpointError, ConfigError

RUN = {"micro_batch_size": 4, "grad_accum_steps": 2, "mixed_precision": "bf16",
       "max_grad_norm": 1.0}


def _config(strategy: str = "deepspeed_zero2", **kwargs) -> dict:
    return dsc.build_config(strategy, **{**RUN, **kwargs})


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed counts as installed (the engine's own code needs none of it here)."""
    monkeypatch.setattr(dsc, "deepspeed_available", lambda: True)


# ------------------------------------------------------------------ without DeepSpeed


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_without_deepspeed_the_strategy_is_refused_with_the_extra(
        strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dsc, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        build_engine(strategy)
    assert err.value.exit_code == 2
    assert "pip install 'finetune[deepspeed]'" in str(err.value)
    assert "distributed=fsdp2" in str(err.value)


def test_deepspeed_availability_is_read_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed means importable from sys.path; finding it does not import it."""
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    (tmp_path / "without").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "without")])
    assert dsc.deepspeed_available() is False
    package = tmp_path / "with" / "deepspeed"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "with")])
    assert dsc.deepspeed_available() is True
    assert "deepspeed" not in sys.modules


def test_other_strategies_never_ask_for_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(dsc, "deepspeed_available", lambda: asked.append("asked") or False)
    for strategy in ("single", "ddp", "fsdp2"):
        assert dsc.require_deepspeed(strategy) is None
    assert asked == []
    with pytest.raises(ConfigError, match="distributed=deepspeed_zero3 needs DeepSpeed"):
        dsc.require_deepspeed("deepspeed_zero3")
    assert asked == ["asked"]


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


class FakeZero:
    """Stands for DeepSpeed's ZeRO-2 optimizer on one rank: a torch AdamW over one flat fp32
    partition, a loss scaler, and the master weights and Adam moments of each weight (what
    deepspeed.utils' safe_get/safe_set functions reach, see `fake_tensor_api`)."""

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self.flat = torch.zeros(sum(p.numel() for p in params))
        self.optimizer = torch.optim.AdamW([self.flat], lr=lr)
        self.single_partition_of_fp32_groups = [self.flat]
        self.loss_scaler = type("Scaler", (), {"cur_scale": 1.0, "cur_iter": 0})()
        self.master = {p: p.detach().clone() for p in params}
        self.moments: dict = {p: {} for p in params}
        self.linked = False

    def take_step(self) -> None:
        self.flat.grad = torch.ones_like(self.flat)
        self.optimizer.step()
        for p in self.master:
            self.master[p] = torch.rand(p.shape)
            self.moments[p] = {k: torch.rand(p.shape) for k in ("exp_avg", "exp_avg_sq")}

    def _lazy_init_hp_params_optimizer_state(self) -> None:
        self.linked = True


class FakeEngine:
    """Stands for deepspeed.DeepSpeedEngine: records the calls the engine makes."""

    def __init__(self, module: torch.nn.Module, *, world_size: int = 2, norm=2.5,
                 clipping: float = 1.0) -> None:
        self.module, self.world_size, self.global_rank = module, world_size, 0
        self.norm, self.clipping = norm, clipping
        self.boundaries: list[bool] = []
        self.steps = 0
        self.optimizer = FakeZero(module)
        self.global_steps = self.global_samples = self.skipped_steps = 0

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        self.boundaries.append(value)

    def gradient_clipping(self) -> float:
        return self.clipping

    def step(self) -> None:
        self.steps += 1

    def get_global_grad_norm(self):
        return self.norm


@pytest.fixture
def fake_tensor_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed.utils' tensor functions over FakeZero (the real ones run in
    tests/e2e/test_deepspeed.py)."""
    utils = types.ModuleType("deepspeed.utils")

    def zero(param):
        return param._fake_zero

    utils.safe_get_full_fp32_param = lambda p: zero(p).master[p]
    utils.safe_get_full_optimizer_state = lambda p, key: zero(p).moments[p][key]

    def set_master(p, value):
        zero(p).master[p] = value.clone()

    def set_moment(p, value, key):
        assert zero(p).linked, "DeepSpeed links the optimizer state before it is set"
        zero(p).moments[p][key] = value.clone()

    utils.safe_set_full_fp32_param = set_master
    utils.safe_set_full_optimizer_state = set_moment
    utils.safe_set_local_fp32_param = utils.safe_set_local_optimizer_state = None  # ZeRO-3's
    package = types.ModuleType("deepspeed")
    package.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", package)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)


def _lora_like() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return model


def _engine(installed: None, fake: FakeEngine) -> ds.DeepSpeedZero:
    engine = ds.DeepSpeedZero("deepspeed_zero2")
    engine._engine = fake
    for param in fake.module.parameters():
        param._fake_zero = fake.optimizer
    return engine


def _save(engine: ds.DeepSpeedZero, model: torch.nn.Module, directory: Path) -> None:
    trainable, optimizer, shards = engine.save_state(model, None)
    assert (trainable, optimizer) == ({}, {})  # the trainer writes shards through the engine
    engine.save_shards(shards, directory)


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


def test_a_checkpoint_is_safetensors_and_json(installed: None, fake_tensor_api: None,
                                              tmp_path: Path) -> None:
    model = _lora_like()
    fake = FakeEngine(model)
    fake.optimizer.take_step()
    fake.optimizer.take_step()
    _save(_engine(installed, fake), model, tmp_path)
    files = sorted(p.name for p in (tmp_path / "deepspeed").iterdir())
    assert files == [ds.MASTER, ds.STATE]  # no pickled file
    state = json.loads((tmp_path / "deepspeed" / ds.STATE).read_text())
    assert state["world_size"] == 2
    assert state["trainable"] == {"0.bias": [4], "1.weight": [2, 4], "1.bias": [2]}
    assert state["optimizer"]["tensor_keys"] == ["exp_avg", "exp_avg_sq"]
    assert state["optimizer"]["scalars"]["step"]["tensor"] == 2.0
    saved = load_file(str(tmp_path / "deepspeed" / ds.MASTER))
    assert torch.equal(saved["fp32/1.weight"], fake.optimizer.master[model[1].weight])
    assert torch.equal(saved["exp_avg_sq/0.bias"],
                       fake.optimizer.moments[model[0].bias]["exp_avg_sq"])


def test_other_ranks_gather_but_write_nothing(installed: None, fake_tensor_api: None,
                                              tmp_path: Path) -> None:
    model = _lora_like()
    fake = FakeEngine(model)
    fake.global_rank = 1
    _save(_engine(installed, fake), model, tmp_path)
    assert not (tmp_path / "deepspeed").exists()


def test_resume_sets_every_tensor_the_step_and_the_groups_on_another_world_size(
        installed: None, fake_tensor_api: None, tmp_path: Path) -> None:
    model = _lora_like()
    saved = FakeEngine(model)
    saved.optimizer.take_step()
    saved.optimizer.take_step()
    saved.optimizer.optimizer.param_groups[0]["lr"] = 0.25  # where the schedule had got to
    saved.global_steps = 2
    _save(_engine(installed, saved), model, tmp_path)

    fresh = FakeEngine(model, world_size=4)  # a new run: no optimizer state yet
    _engine(installed, fresh).load_state(model, None, tmp_path, {}, {})
    for param in saved.optimizer.master:
        assert torch.equal(fresh.optimizer.master[param], saved.optimizer.master[param])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.optimizer.moments[param][key],
                               saved.optimizer.moments[param][key])
    # Adam's step (its bias correction) continues: the same tensor on the same device.
    state = fresh.optimizer.optimizer.state[fresh.optimizer.flat]
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 2.0
    assert state["exp_avg"].shape == fresh.optimizer.flat.shape
    assert fresh.optimizer.optimizer.param_groups[0]["lr"] == 0.25
    assert fresh.optimizer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert fresh.global_steps == 2
    # The 16-bit weight the forward uses is the master weight.
    assert torch.equal(model[1].weight.detach(), saved.optimizer.master[model[1].weight])


def test_a_checkpoint_before_the_first_step_has_no_optimizer_state(
        installed: None, fake_tensor_api: None, tmp_path: Path) -> None:
    model = _lora_like()
    _save(_engine(installed, FakeEngine(model)), model, tmp_path)
    fresh = FakeEngine(model)
    _engine(installed, fresh).load_state(model, None, tmp_path, {}, {})
    assert fresh.optimizer.optimizer.state == {}


def test_resume_with_another_adapter_shape_is_refused(installed: None, fake_tensor_api: None,
                                                      tmp_path: Path) -> None:
    model = _lora_like()
    _save(_engine(installed, FakeEngine(model)), model, tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    wider[0].weight.requires_grad_(False)
    fake = FakeEngine(wider)
    with pytest.raises(CheckpointError, match="shape differs"):
        _engine(installed, fake).load_state(wider, None, tmp_path, {}, {})
    assert fake.optimizer.linked is False  # refused before anything was set


def test_resume_from_another_strategys_checkpoint_is_refused(installed: None,
                                                             tmp_path: Path) -> None:
    model = _lora_like()
    (tmp_path / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="another strategy"):
        _engine(installed, FakeEngine(model)).load_state(model, None, tmp_path, {}, {})


def test_deepspeeds_own_pickled_format_is_not_read(installed: None, tmp_path: Path) -> None:
    model = _lora_like()
    (tmp_path / "deepspeed" / "state").mkdir(parents=True)
    (tmp_path / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unpickle"):
        _engine(installed, FakeEngine(model)).load_state(model, None, tmp_path, {}, {})


def test_an_8_bit_optimizer_state_is_refused_with_the_fix() -> None:
    flat = torch.zeros(8)
    optimizer = torch.optim.SGD([flat], lr=0.1)
    optimizer.state[flat] = {"state1": torch.zeros(2, dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match="kernels.optimizer"):
        ds._optimizer_entries(optimizer, [flat])


def test_a_zero3_partition_is_this_ranks_padded_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    param.ds_tensor = torch.zeros(4)  # 7 elements over 2 ranks: 4 each, the last one padded
    full = torch.arange(7.0)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    assert ds._local_partition(param, full).tolist() == [0, 1, 2, 3]
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert ds._local_partition(param, full).tolist() == [4, 5, 6, 0]
