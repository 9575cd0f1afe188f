"""The end-of-run summary: summary.json's figures and the lines printed when a run ends."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory allocated on CUDA/ROCm; peak resident memory of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def tenth_mean(values: list[float], last: bool) -> float | None:
    """Mean of the first (or last) tenth of `values`, at least one value; None when empty."""
    if not values:
        return None
    n = max(1, len(values) // 10)
    part = values[-n:] if last else values[:n]
    return sum(part) / len(part)


def run_summary(progress: dict[str, Any], losses: list[float], data_stats: dict[str, Any], *,
                total_steps: int, world_size: int, device: torch.device,
                resume_changes: list[str], forced_changes: list[str],
                history_complete: bool = True) -> dict[str, Any]:
    """summary.json: `progress` is the loop state (step, tokens_seen, elapsed_s, ...), `losses`
    every step's loss metrics.jsonl holds for the run (across resumes); `history_complete` is
    False when it lost steps from before a resume, so first_loss covers only what it holds."""
    elapsed = progress["elapsed_s"]
    return {
        "steps": progress["step"],
        "total_steps": total_steps,
        "tokens_seen": progress["tokens_seen"],
        "elapsed_s": round(elapsed, 3),
        "trained_tokens_per_s": progress["tokens_seen"] / elapsed if elapsed else None,
        "first_loss": tenth_mean(losses, last=False),
        "loss_history": "complete" if history_complete else "partial",
        "last_loss": tenth_mean(losses, last=True),
        "eval_loss": progress["last_eval_loss"],
        "best_eval_loss": progress["best_eval_loss"],
        "nan_skipped_steps": progress["nan_skipped"],
        "skipped_rows": data_stats.get("skipped_rows", 0),
        "truncated_rows": data_stats.get("truncated_rows", 0),
        "dropped_rows": data_stats.get("dropped_rows", 0),
        "data": data_stats,
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "world_size": world_size,
        "resume_changes": resume_changes,
        "resume_forced_changes": forced_changes,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def print_summary(out: Callable[[str], None], summary: dict[str, Any], final: Path) -> None:
    """The closing lines of a run: loss change, eval loss, steps, tokens, time, outputs."""
    first, last = summary["first_loss"], summary["last_loss"]
    drop = f" ({(1 - last / first):.0%} lower)" if first and last else ""
    out("")
    out("done.")
    if first is not None:
        partial = "" if summary["loss_history"] == "complete" else (
            " [partial history: metrics.jsonl lost steps from before a resume]")
        out(f"  loss: {first:.4f} (first tenth) -> {last:.4f} (last tenth){drop}{partial}")
    if summary["eval_loss"] is not None:
        out(f"  eval loss: {summary['eval_loss']:.4f}")
    out(f"  steps: {summary['steps']}, trained tokens: {summary['tokens_seen']}, "
        f"time: {summary['elapsed_s']:.1f} s")
    data = summary["data"]
    out(f"  rows: {summary['truncated_rows']} truncated, {summary['dropped_rows']} dropped, "
        f"{summary['skipped_rows']} skipped of {data.get('rows_read', 0)} read "
        f"(max_seq_len {data.get('max_seq_len')}: {data.get('max_seq_len_from', '')})")
    out(f"  final model: {final}")
