"""`finetune env --autotune`: the measured table of every candidate, the plan it gives, and the
cache it fills; with injected timings, so it runs in a moment."""

from __future__ import annotations

import json

import pytest

from finetune.commands.env import main
from finetune.hardware import detect
from finetune.kernels import autotune
from finetune.kernels.autotune import Timing, cache_dir

FAKE_MS = {"sdpa": 2.0, "sdpa_varlen": 9.0, "eager": 30.0, "fused": 1.0, "peft": 1.5,
           "adamw_fused": 0.3, "adamw_foreach": 0.6, "adamw": 0.9}


@pytest.fixture
def fake_timings(tmp_path, monkeypatch):
    if detect().vendor != "cpu":
        pytest.skip("the injected timings name this CPU's candidates")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))

    def timed(self, family, candidate):
        ms = FAKE_MS[candidate.name]
        return Timing(ms, ms, ms)

    monkeypatch.setattr(autotune.MeasuringTuner, "_time", timed)
    monkeypatch.setattr(autotune, "measure_matmul_rates", lambda device: {"bf16": 0.5,
                                                                          "fp32": 0.25})
    return tmp_path


def test_env_autotune_prints_every_candidate_and_the_overturned_choice(fake_timings,
                                                                      capsys) -> None:
    assert main(["--autotune", "--doc-length", "64", "data.packing=true",
                 "data.max_seq_len=256"]) == 0
    out = capsys.readouterr().out
    assert "dense matmul: bf16 0.5 TFLOP/s, fp32 0.25 TFLOP/s" in out
    lines = {tuple(line.split()[:2]): line for line in out.splitlines()
             if line.startswith("  ")}
    assert "chosen" in lines[("attention", "sdpa")]
    assert "table's choice" in lines[("attention", "sdpa_varlen")]
    assert "2.000 ms" in lines[("attention", "sdpa")] and ("attention", "eager") in lines
    assert "the measurement overturns the table" in out
    assert len(list((fake_timings / "autotune").glob("*.json"))) == 2


def test_env_autotune_json(fake_timings, capsys) -> None:
    assert main(["--autotune", "--json", "data.max_seq_len=256"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["measured"]["attention"]["sdpa"]["median_ms"] == 2.0
    assert data["kernel_plan"]["kernels"]["attention"]["choice"] == "sdpa"
    assert data["kernel_plan"]["kernels"]["attention"]["measured_ms"]["eager"] == 30.0
    assert cache_dir() == fake_timings / "autotune"


def test_env_autotune_refuses_a_simulated_profile(capsys) -> None:
    assert main(["--autotune", "--profile", "h100"]) == 2
    assert "--autotune times this machine's kernels" in capsys.readouterr().err


def test_env_checks_the_autotune_value(capsys) -> None:
    assert main(["kernels.autotune=maybe"]) == 2
    assert "use one of: auto, on, off" in capsys.readouterr().err
