"""The end-of-run summary: summary.json's figures (the lines printed from them are in
finetune.metrics.banner)."""

from __future__ import annotations

import sys
from typing import Any

import torch

from finetune.metrics.memory import peak_memory_gb


def tenth_mean(values: list[float], last: bool) -> float | None:
    """Mean of the first (or last) tenth of `values`, at least one value; None when empty."""
    if not values:
        return None
    n = max(1, len(values) // 10)
    part = values[-n:] if last else values[:n]
    return sum(part) / len(part)


def step_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput, MFU, peak memory and best eval loss over metrics.jsonl's records.

    Means are weighted by step time (total tokens over total time; MFU the same way) and leave
    out the first step, which pays one-time warm-up (allocator, kernel selection, compile).
    """
    steps = [r for r in records if "loss" in r and r.get("step_time_s")]
    timed = steps[1:] if len(steps) > 1 else steps
    seconds = sum(r["step_time_s"] for r in timed)
    with_mfu = [r for r in timed if r.get("mfu") is not None]
    mfu_seconds = sum(r["step_time_s"] for r in with_mfu)
    evals = [r for r in records if r.get("eval_loss") is not None]
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    peaks = [r["peak_mem_gb"] for r in steps if r.get("peak_mem_gb") is not None]
    return {
        "mean_tokens_per_s": sum(r["tokens"] for r in timed) / seconds if seconds else None,
        "mean_mfu": (sum(r["mfu"] * r["step_time_s"] for r in with_mfu) / mfu_seconds
                     if mfu_seconds else None),
        "best_eval_step": best["step"] if best else None,
        "recorded_peak_memory_gb": max(peaks) if peaks else None,
    }


def run_summary(progress: dict[str, Any], losses: list[float], data_stats: dict[str, Any], *,
                total_steps: int, world_size: int, device: torch.device,
                resume_changes: list[dict[str, Any]], forced_changes: list[dict[str, Any]],
                history_complete: bool = True,
                records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """summary.json: `progress` is the loop state (step, tokens_seen, elapsed_s, ...), `losses`
    every step's loss metrics.jsonl holds for the run (across resumes); `history_complete` is
    False when it lost steps from before a resume, so first_loss covers only what it holds.
    `records` (metrics.jsonl's rows, `writers.read_records`) adds the mean tokens/s and MFU
    and the best eval step; the peak memory is the larger of this process's and the records'
    (an earlier session of a resumed run may have peaked higher). `resume_changes` and
    `forced_changes` hold one {"step", "changes"} per resume that changed the config."""
    elapsed = progress["elapsed_s"]
    figures = step_figures(records or [])
    recorded_peak = figures.pop("recorded_peak_memory_gb")
    peak = max(peak_memory_gb(device), recorded_peak or 0.0)
    return {
        "steps": progress["step"],
        "total_steps": total_steps,
        "tokens_seen": progress["tokens_seen"],
        "pairs_seen": progress.get("pairs_seen") or None,  # None: not a preference recipe
        "elapsed_s": round(elapsed, 3),
        "trained_tokens_per_s": progress["tokens_seen"] / elapsed if elapsed else None,
        "mean_tokens_per_s": figures["mean_tokens_per_s"],
        "mean_mfu": figures["mean_mfu"],
        "first_loss": tenth_mean(losses, last=False),
        "loss_history": "complete" if history_complete else "partial",
        "last_loss": tenth_mean(losses, last=True),
        "eval_loss": progress["last_eval_loss"],
        "best_eval_loss": progress["best_eval_loss"],
        "best_eval_step": figures["best_eval_step"],
        "nan_skipped_steps": progress["nan_skipped"],
        "skipped_rows": data_stats.get("skipped_rows", 0),
        "truncated_rows": data_stats.get("truncated_rows", 0),
        "dropped_rows": data_stats.get("dropped_rows", 0),
        "data": data_stats,
        "peak_memory_gb": round(peak, 3),
        "world_size": world_size,
        "resume_changes": resume_changes,
        "resume_forced_changes": forced_changes,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
