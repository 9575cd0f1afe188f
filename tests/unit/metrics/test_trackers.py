"""Trackers through accelerate: which ones a config builds, W&B's offline fallback, resume and
secrets, TensorBoard event files read back, MLflow's local store."""

from __future__ import annotations

import importlib.util
import logging
import socket
import sys
import types
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker

from finetune.errors import ConfigError
from finetune.metrics import trackers
from finetune.metrics.trackers import (
    MlflowTracker,
    TensorboardTracker,
    WandbTracker,
    build_trackers,
    flatten,
    kernel_rows,
    numbers,
)

PLAN = {"kernels": {"attention": {"choice": "sdpa", "reason": "torch SDPA", "selfcheck": "passed",
                                  "rejected": [{"name": "flash_attention_2",
                                                "reason": "not installed"}]},
                    "optimizer": {"choice": "adamw_fused", "reason": "fused", "rejected": []}}}


def test_a_config_builds_the_trackers_it_switches_on(logger_cfg, tmp_path: Path) -> None:
    assert build_trackers(logger_cfg(), tmp_path) == []
    built = build_trackers(logger_cfg(wandb=True, tensorboard=True), tmp_path)
    assert [type(t) for t in built] == [WandbTracker, TensorboardTracker]
    assert all(isinstance(t, GeneralTracker) for t in built)  # what Accelerator(log_with=) takes


@pytest.mark.parametrize("name", ["mlflow", "tensorboard"])
def test_a_missing_tracker_package_is_named_with_its_install(
        logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module == name else real(module, *a))
    with pytest.raises(ConfigError, match=rf"pip install 'finetune\[{name}\]'"):
        build_trackers(logger_cfg(**{name: True}), tmp_path)


def test_flatten_and_numbers() -> None:
    from finetune.config.schema import PeftMethod

    flat = flatten({"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "peft": {"method": PeftMethod.lora},
                    "resume": None})
    assert flat == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.99]", "peft.method": "lora",
                    "resume": "None"}
    assert type(flat["peft.method"]) is str
    assert numbers({"loss": 1.5, "mfu": None, "lr": float("nan"), "epoch": 0, "note": "x",
                    "skipped_non_finite": True}) == {"loss": 1.5, "epoch": 0,
                                                     "skipped_non_finite": True}


def test_kernel_rows() -> None:
    assert kernel_rows(PLAN) == [
        ["attention", "sdpa", "torch SDPA", "passed", "flash_attention_2: not installed"],
        ["optimizer", "adamw_fused", "fused", "", ""]]


# ---------------------------------------------------------------- W&B, with a stand-in module


def _wandb(logger_cfg, tmp_path: Path, **fields) -> WandbTracker:
    return WandbTracker(logger_cfg(wandb=True, project="proj", **fields), tmp_path)


def test_wandb_logs_config_plan_steps_and_summary(fake_wandb, logger_cfg, tmp_path: Path) -> None:
    report = tmp_path / "report.png"
    report.write_bytes(b"png")
    tracker = _wandb(logger_cfg, tmp_path, mode="offline", entity="team", tags=["a"])
    tracker.start()
    assert fake_wandb.init_kwargs == {
        "mode": "offline", "project": "proj", "entity": "team", "name": tmp_path.name,
        "tags": ["a"], "dir": str(tmp_path), "id": None, "resume": None}
    tracker.store_init_configuration({"optim": {"lr": 1e-4}, "kernel_plan": PLAN})
    tracker.describe(PLAN)
    tracker.log({"loss": 2.0}, step=3)
    tracker.log_summary({"last_loss": 1.5, "data": {"rows": 10}}, report)
    tracker.finish()
    tracker.finish()  # accelerate's end_training calls it again: once is enough
    run = fake_wandb.run
    assert run.config.values == {"optim": {"lr": 1e-4}, "kernel_plan": PLAN}
    assert run.rows[0]["kernel_plan"]["data"] == kernel_rows(PLAN)
    assert run.rows[1] == {"loss": 2.0, "step": 3}  # plotted against our step
    assert ("*", {"step_metric": "step"}) in run.metrics
    assert run.summary == {"last_loss": 1.5, "data.rows": 10}
    assert run.rows[2] == {"report": {"image": str(report)}}
    assert run.finished == 1


def test_wandb_resume_continues_the_run(fake_wandb, logger_cfg, tmp_path: Path) -> None:
    tracker = _wandb(logger_cfg, tmp_path, mode="offline")
    tracker.resume("abc123")
    assert tracker.current_run_id() == "abc123"
    tracker.start()
    assert (fake_wandb.init_kwargs["id"], fake_wandb.init_kwargs["resume"]) == ("abc123", "allow")
    assert tracker.current_run_id() == "abc123"


def test_wandb_without_a_key_goes_offline_in_one_line(
        fake_wandb, no_wandb_key, logger_cfg, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    tracker = _wandb(logger_cfg, tmp_path)  # mode online
    with caplog.at_level(logging.WARNING, logger="finetune.metrics.trackers"):
        tracker.start()
    assert [kwargs["mode"] for kwargs in fake_wandb.inits] == ["offline"]
    lines = [r.getMessage() for r in caplog.records]
    sync_dir = fake_wandb.run.settings.sync_dir
    assert len(lines) == 1 and "no W&B API key" in lines[0]
    assert f"wandb sync {sync_dir}" in lines[0]


def test_wandb_with_a_key_but_no_network_goes_offline(
        fake_wandb, no_wandb_key, logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.invalid")

    def refuse(address, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with caplog.at_level(logging.WARNING, logger="finetune.metrics.trackers"):
        _wandb(logger_cfg, tmp_path).start()
    assert [kwargs["mode"] for kwargs in fake_wandb.inits] == ["offline"]
    assert "https://wandb.example.invalid cannot be reached" in caplog.text


def test_a_hanging_host_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection (or DNS lookup) that never answers must not hold the run."""
    import threading

    release, answered = threading.Event(), threading.Event()

    def hang(address, timeout=None):
        release.wait(30)
        answered.set()
        return types.SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(socket, "create_connection", hang)
    assert not trackers._reachable("https://api.wandb.ai", timeout_s=0.2)
    assert not answered.is_set()  # it gave up while the connection still hung
    release.set()


def test_wandb_that_fails_online_retries_offline(
        fake_wandb, logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(trackers, "wandb_offline_reason", lambda: None)  # key and host fine
    fake_wandb.fail_online = True
    with caplog.at_level(logging.WARNING, logger="finetune.metrics.trackers"):
        _wandb(logger_cfg, tmp_path).start()
    assert [kwargs["mode"] for kwargs in fake_wandb.inits] == ["online", "offline"]
    assert "TimeoutError" in caplog.text and "wandb sync" in caplog.text


def test_wandb_disabled_never_probes_the_network(
        fake_wandb, logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "wandb_offline_reason",
                        lambda: pytest.fail("probed the network"))
    _wandb(logger_cfg, tmp_path, mode="disabled").start()
    assert fake_wandb.init_kwargs["mode"] == "disabled"


# ---------------------------------------------------------------- TensorBoard, for real


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorboardTracker(tmp_path)
    tracker.start()
    tracker.store_init_configuration({"optim": {"lr": 2e-4}, "recipe": "lora_sft"})
    tracker.describe(PLAN)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0)]:
        tracker.log(numbers({"loss": loss, "mfu": None, "tokens_per_s": 100.0 * step}), step=step)
    tracker.log({"eval_loss": 2.2}, step=3)
    tracker.log_summary({"last_loss": 2.0}, None)
    tracker.finish()
    tb = tmp_path / "tb"
    assert [p.parent for p in tb.rglob("events.out.tfevents.*")] == [tb]  # one event file
    events = EventAccumulator(str(tb))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval_loss", "loss", "tokens_per_s"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [e.step for e in events.Scalars("eval_loss")] == [3]
    texts = events.Tags()["tensors"]
    assert {"config/text_summary", "kernel_plan/text_summary", "summary/text_summary"} <= set(texts)
    plan_text = events.Tensors("kernel_plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| attention | sdpa | torch SDPA | passed | flash_attention_2: not installed |" in plan_text


# ---------------------------------------------------------------- MLflow


class FakeMlflow(types.ModuleType):
    """Records the tracking URI, experiment, run and what is logged."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.uri = None
        self.params: dict = {}
        self.metrics: list = []
        self.dicts: dict = {}
        self.started: dict = {}
        self.ended = 0
        self.utils = types.SimpleNamespace(validation=types.SimpleNamespace(
            MAX_PARAM_VAL_LENGTH=6000, MAX_PARAMS_TAGS_PER_BATCH=100))

    def set_tracking_uri(self, uri: str) -> None:
        self.uri = uri

    def search_experiments(self, filter_string: str) -> list:
        return []

    def create_experiment(self, name: str, artifact_location=None, tags=None) -> str:
        self.experiment = (name, artifact_location)
        return "7"

    def start_run(self, **kwargs):
        self.started = kwargs
        return types.SimpleNamespace(info=types.SimpleNamespace(
            run_id=kwargs["run_id"] or "new-run"))

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step=None) -> None:
        self.metrics.append((metrics, step))

    def log_dict(self, value: dict, name: str) -> None:
        self.dicts[name] = value

    def log_artifact(self, path: str) -> None:
        self.dicts["artifact"] = path

    def end_run(self) -> None:
        self.ended += 1


def test_mlflow_defaults_to_a_store_in_the_run_dir(
        logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    tracker = MlflowTracker(logger_cfg(mlflow=True, project="exp"), tmp_path)
    tracker.resume("run-9")
    tracker.start()
    assert fake.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert fake.experiment == ("exp", (tmp_path / "mlartifacts").as_uri())
    assert fake.started["run_id"] == "run-9" and tracker.current_run_id() == "run-9"
    tracker.store_init_configuration({"optim": {"lr": 1e-4}, "long": "x" * 900})
    assert fake.params == {"optim.lr": "0.0001", "long": "x" * 500}
    tracker.log({"loss": 2.0}, step=4)
    tracker.describe(PLAN)
    tracker.log_summary({"last_loss": 2.0}, None)
    tracker.finish()
    tracker.finish()
    assert fake.metrics == [({"loss": 2.0}, 4)]
    assert fake.dicts == {"kernel_plan.json": PLAN, "summary.json": {"last_loss": 2.0}}
    assert fake.ended == 1


def test_mlflow_uses_the_configured_server(
        logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    tracker = MlflowTracker(logger_cfg(mlflow=True), tmp_path)
    tracker.start()
    assert fake.uri is None and fake.experiment == ("finetune", None)


def test_real_mlflow_records_a_run_in_the_run_dir(
        logger_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    import mlflow

    tracker = MlflowTracker(logger_cfg(mlflow=True), tmp_path)
    tracker.start()
    tracker.store_init_configuration({"optim": {"lr": 1e-4}})
    tracker.log({"loss": 2.0}, step=1)
    tracker.finish()
    run = mlflow.get_run(tracker.current_run_id())
    assert run.data.params == {"optim.lr": "0.0001"} and run.data.metrics == {"loss": 2.0}
    assert (tmp_path / "mlflow.db").is_file()
