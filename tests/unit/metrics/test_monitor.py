"""RunMonitor: step records completed and written once, MFU from counted FLOPs, trackers
started with the config and resumed by id, the end report and summary, rank 0 only."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from finetune.metrics import monitor as monitor_module
from finetune.metrics.flops import FlopCounter, TrainingMode
from finetune.metrics.monitor import RunMonitor
from tests.unit.metrics.conftest import FakeAccelerator

STEP = {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "tokens": 4000,
        "trained_tokens": 1000, "step_time_s": 2.0, "data_wait_s": 0.01, "epoch": 0}


@pytest.fixture(scope="module")
def cfg():
    from finetune.config.compose import compose_run_config

    return compose_run_config("lora_sft", ["trainer.log_every_n_steps=1",
                                           "logger.display=plain"])


def _plan(profile: str):
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware.simulated import profile_by_name
    from finetune.kernels import plan

    return plan(profile_by_name(profile, "all"), KernelsConfig())


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM._from_config(config)


class FakeTracker:
    """A tracker as build_trackers makes them, recording the calls a monitor makes."""

    resume_key = "wandb_run_id"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.run_id: str | None = None

    def resume(self, run_id):
        self.run_id = run_id

    def current_run_id(self):
        return self.run_id or "new-id"

    def start(self):
        self.calls.append(("start", self.run_id))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def describe(self, plan):
        self.calls.append(("describe", plan))

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def log_summary(self, summary, report):
        self.calls.append(("summary", summary, report))

    def finish(self):
        self.calls.append(("finish",))


def _monitor(cfg, tmp_path: Path, plan, **accelerator) -> tuple[RunMonitor, io.StringIO]:
    from finetune.metrics.display import make_console

    stream = io.StringIO()
    acc = FakeAccelerator(**accelerator)
    return RunMonitor(cfg, tmp_path, acc, plan, console=make_console(stream)), stream


def _start(monitor: RunMonitor, model, **kwargs) -> None:
    monitor.start(model, total_steps=3, start_step=0, data_stats={"format": "alpaca"},
                  config={"recipe": "lora_sft"}, **kwargs)


def test_a_step_record_is_completed_and_written_once(cfg, model, tmp_path: Path) -> None:
    monitor, stream = _monitor(cfg, tmp_path, _plan("h100"))
    _start(monitor, model)
    flops = 989e12 * 2.0 * 0.25  # a quarter of an H100's peak for the step's 2 s
    monitor.step(STEP, flops=flops)
    monitor.eval({"step": 1, "eval_loss": 2.25})
    monitor.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tokens_per_s"] == 2000.0 and rows[0]["mfu"] == pytest.approx(0.25)
    assert rows[0]["peak_mem_gb"] > 0 and rows[0]["data_wait_s"] == 0.01
    assert {k: rows[0][k] for k in STEP} == STEP
    assert rows[1] == {"step": 1, "eval_loss": 2.25}
    logged = monitor.accelerator.logged
    assert logged[0][1] == 1 and logged[0][0]["mfu"] == pytest.approx(0.25)
    assert logged[1] == ({"step": 1, "eval_loss": 2.25}, 1)
    out = stream.getvalue()
    assert "step 1/3 | loss 2.5000" in out and "mfu 25.0%" in out
    assert "eval at step 1: loss 2.2500" in out


def test_step_flops_count_the_batches_on_a_known_peak(cfg, model, tmp_path: Path) -> None:
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])}
    monitor, _ = _monitor(cfg, tmp_path, _plan("h100"))
    _start(monitor, model)
    expected = FlopCounter(model.config, TrainingMode(full=True)).step([batch])
    assert monitor.step_flops([batch]) == expected > 0
    monitor.close()


def test_without_a_peak_there_is_no_mfu_and_no_counting(cfg, model, tmp_path: Path) -> None:
    monitor, _ = _monitor(cfg, tmp_path, _plan("cpu"))
    _start(monitor, model)
    assert monitor.step_flops([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]) is None
    monitor.step(STEP, flops=None)
    monitor.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["mfu"] is None and row["tokens_per_s"] == 2000.0


def test_other_ranks_write_and_show_nothing(cfg, model, tmp_path: Path) -> None:
    tracker = FakeTracker()
    monitor, stream = _monitor(cfg, tmp_path, _plan("h100"), trackers=[tracker], main=False)
    monitor.print_plan()
    _start(monitor, model)
    assert monitor.step_flops([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]) is None
    monitor.step(STEP, flops=1e12)
    monitor.eval({"step": 1, "eval_loss": 2.0})
    monitor.line("hello")
    monitor.finish({}, tmp_path / "final")
    monitor.close()
    assert list(tmp_path.iterdir()) == [] and stream.getvalue() == ""


def test_trackers_start_with_config_and_plan_and_resume(cfg, model, tmp_path: Path) -> None:
    tracker = FakeTracker()
    plan = _plan("h100")
    monitor, _ = _monitor(cfg, tmp_path, plan, trackers=[tracker])
    _start(monitor, model, resumed={"wandb_run_id": "run-7", "step": 3})
    assert tracker.calls[0] == ("start", "run-7")
    assert tracker.calls[1] == ("config", {"recipe": "lora_sft", "kernel_plan": plan.to_dict()})
    assert tracker.calls[2] == ("describe", plan.to_dict())
    assert monitor.accelerator.init_args[0] == cfg.logger.project
    assert monitor.state_dict() == {"wandb_run_id": "run-7", "mlflow_run_id": None}
    monitor.close()


def test_a_resumed_id_is_kept_while_its_tracker_is_off(cfg, model, tmp_path: Path) -> None:
    monitor, _ = _monitor(cfg, tmp_path, _plan("cpu"))
    assert monitor.state_dict() == {"wandb_run_id": None, "mlflow_run_id": None}
    _start(monitor, model, resumed={"wandb_run_id": "run-7"})
    assert monitor.state_dict()["wandb_run_id"] == "run-7"
    monitor.close()


def _summary(**figures) -> dict:
    return {"first_loss": 3.0, "last_loss": 2.0, "loss_history": "complete", "eval_loss": 2.2,
            "best_eval_loss": 2.1, "steps": 3, "tokens_seen": 3000, "elapsed_s": 6.0,
            "mean_tokens_per_s": 1500.0, "mean_mfu": 0.3, "peak_memory_gb": 1.25,
            "truncated_rows": 0, "dropped_rows": 0, "skipped_rows": 0,
            "data": {"rows_read": 10, "max_seq_len": 64, "max_seq_len_from": "auto"}, **figures}


def test_finish_writes_the_report_and_closes_trackers_once(cfg, model, tmp_path: Path) -> None:
    tracker = FakeTracker()
    monitor, stream = _monitor(cfg, tmp_path, _plan("h100"), trackers=[tracker])
    _start(monitor, model)
    for step in (1, 2, 3):
        monitor.step({**STEP, "step": step}, flops=1e14)
    monitor.finish(_summary(), tmp_path / "final")
    monitor.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    summary_call = [c for c in tracker.calls if c[0] == "summary"]
    assert summary_call == [("summary", _summary(), tmp_path / "report.png")]
    assert tracker.calls.count(("finish",)) == 1 and tracker.calls[-1] == ("finish",)
    out = stream.getvalue()
    assert out.index("step 3/3") < out.index("done.")
    assert "  throughput: 1,500 tokens/s (mean), MFU 30.0%" in out
    assert "  eval loss: 2.2000 (best 2.1000)" in out and "  peak memory: 1.25 GiB" in out
    assert f"  outputs: {tmp_path} (metrics.jsonl, report.png)" in out
    assert f"  final model: {tmp_path / 'final'}" in out


def test_a_failed_report_does_not_fail_the_run(cfg, model, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("finetune.metrics.report.plot_run", broken)
    tracker = FakeTracker()
    monitor, stream = _monitor(cfg, tmp_path, _plan("cpu"), trackers=[tracker])
    _start(monitor, model)
    monitor.step(STEP)
    monitor.finish(_summary(), tmp_path / "final")
    assert "report.png not written: RuntimeError: no fonts" in caplog.text
    assert ("summary", _summary(), None) in tracker.calls and "done." in stream.getvalue()


def test_the_start_banner_in_plain_lines(cfg, model, tmp_path: Path) -> None:
    monitor, stream = _monitor(cfg, tmp_path, _plan("h100"))
    monitor.print_plan()
    _start(monitor, model)
    monitor.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"finetune lora_sft: output_dir={tmp_path}"
    assert lines[1].startswith("hardware: ") and "989 bf16 TFLOP/s peak" in lines[1]
    assert any(line.startswith("attention: ") for line in lines)
    assert any(line.startswith("model: tiny, ") and "trainable (lora r=16)" in line
               for line in lines)
    assert "logging: metrics.jsonl, console (plain)" in lines


def test_with_real_accelerate_and_tensorboard(cfg, model, tmp_path: Path) -> None:
    """The trackers go to Accelerator(log_with=...) as built; init_trackers starts them."""
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.metrics.trackers import build_trackers

    cfg_tb = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, tensorboard=True))
    acc = Accelerator(cpu=True, log_with=build_trackers(cfg_tb.logger, tmp_path),
                      project_dir=str(tmp_path))
    monitor = RunMonitor(cfg_tb, tmp_path, acc, _plan("cpu"),
                         console=monitor_module.make_console(io.StringIO()))
    _start(monitor, model)
    monitor.step(STEP)
    monitor.step({**STEP, "step": 2, "loss": 2.0})
    monitor.finish(_summary(), tmp_path / "final")
    monitor.close()
    acc.end_training()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert "peak_mem_gb" in events.Tags()["scalars"] and "mfu" not in events.Tags()["scalars"]


def test_measured_matmul_rate_gives_mfu_measured_where_no_peak_is_known(cfg, model,
                                                                         tmp_path: Path) -> None:
    measured = dataclasses.replace(_plan("cpu"), autotune={"matmul_tflops": {"bf16": 2.0,
                                                                             "fp32": 0.5}})
    monitor, _ = _monitor(cfg, tmp_path, measured)
    _start(monitor, model)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    flops = monitor.step_flops([batch])
    assert flops is not None and flops > 0
    monitor.step(STEP, flops=flops)
    monitor.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    rate = 0.5e12 if measured.precision == "fp32" else 2.0e12
    assert row["mfu"] is None
    assert row["mfu_measured"] == pytest.approx(flops / STEP["step_time_s"] / rate)
