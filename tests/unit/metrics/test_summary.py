"""summary.json's figures from the loop state and metrics.jsonl, and peak memory."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.memory import memory_source, peak_memory_gb, peak_rss_gb
from finetune.metrics.summary import run_summary, step_figures

PROGRESS = {"step": 3, "tokens_seen": 300, "elapsed_s": 6.0, "last_eval_loss": 2.2,
            "best_eval_loss": 2.1, "nan_skipped": 0}
RECORDS = [
    {"step": 1, "loss": 3.0, "tokens": 100, "step_time_s": 5.0, "mfu": 0.01, "peak_mem_gb": 1.0},
    {"step": 2, "loss": 2.5, "tokens": 400, "step_time_s": 1.0, "mfu": 0.5, "peak_mem_gb": 3.5},
    {"step": 2, "eval_loss": 2.1},
    {"step": 3, "loss": 2.0, "tokens": 200, "step_time_s": 1.0, "mfu": 0.3, "peak_mem_gb": 3.5},
    {"step": 3, "eval_loss": 2.2},
]


def test_means_are_time_weighted_and_skip_the_warm_up_step() -> None:
    figures = step_figures(RECORDS)
    assert figures["mean_tokens_per_s"] == (400 + 200) / 2.0
    assert figures["mean_mfu"] == pytest.approx((0.5 + 0.3) / 2)
    assert figures["best_eval_step"] == 2 and figures["recorded_peak_memory_gb"] == 3.5


def test_figures_without_records_are_unknown() -> None:
    assert step_figures([]) == {"mean_tokens_per_s": None, "mean_mfu": None,
                                "best_eval_step": None, "recorded_peak_memory_gb": None}
    no_mfu = [{**r, "mfu": None} for r in RECORDS]
    assert step_figures(no_mfu)["mean_mfu"] is None


def _summary(records=None) -> dict:
    return run_summary(PROGRESS, [3.0, 2.5, 2.0], {"rows_read": 10}, total_steps=3,
                       world_size=1, device=torch.device("cpu"), resume_changes=[],
                       forced_changes=[], records=records)


def test_summary_holds_throughput_mfu_and_the_larger_peak() -> None:
    summary = _summary(RECORDS)
    assert summary["mean_tokens_per_s"] == 300.0 and summary["mean_mfu"] == pytest.approx(0.4)
    assert summary["best_eval_loss"] == 2.1 and summary["best_eval_step"] == 2
    # An earlier session of a resumed run may have peaked above this process.
    assert summary["peak_memory_gb"] == round(max(3.5, peak_rss_gb()), 3)
    assert _summary()["mean_tokens_per_s"] is None


def test_peak_memory_on_cpu_is_the_process_peak() -> None:
    before = peak_rss_gb()
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[::4096] = b"x" * len(block[::4096])
    assert peak_memory_gb("cpu") >= before > 0
    assert memory_source("cpu") == "process resident memory"
    assert memory_source("cuda") == "device memory allocated"
