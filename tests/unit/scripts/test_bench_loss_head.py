"""scripts/bench_loss_head.py: both paths run the same loss, each reporting its peak and time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_loss_head  # noqa: E402


def _args(path: str, **overrides) -> argparse.Namespace:
    fields = dict(vocab=5000, hidden=16, tokens=256, steps=1, dtype="fp32",
                  trainable_head=False, path=path)
    return argparse.Namespace(**{**fields, **overrides})


def test_both_paths_report_the_same_loss_with_their_peak_and_time() -> None:
    unfused = bench_loss_head.run_path(_args("unfused"))
    chunked = bench_loss_head.run_path(_args("chunked"))
    assert (unfused["path"], chunked["path"]) == ("unfused", "chunked")
    assert abs(chunked["loss"] - unfused["loss"]) <= 1e-5 * abs(unfused["loss"])
    for result in (unfused, chunked):
        assert result["step_s"] > 0 and result["cpu_s"] > 0 and result["peak_mb"] >= 0


def test_a_trainable_head_in_bf16_runs_both_paths() -> None:
    unfused = bench_loss_head.run_path(_args("unfused", dtype="bf16", trainable_head=True))
    chunked = bench_loss_head.run_path(_args("chunked", dtype="bf16", trainable_head=True))
    assert abs(chunked["loss"] - unfused["loss"]) <= 1e-2 * abs(unfused["loss"])
