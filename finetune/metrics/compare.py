"""Compare finished (or interrupted) runs from their run directories.

A run directory holds config.yaml, metrics.jsonl and, once it has ended, summary.json.
`compare_runs` reads them and returns, per run, the config values that differ between the runs
and the figures a user ranks runs by: final and best loss, throughput, MFU, peak memory. A run
without summary.json (still going, or stopped) gets its figures from metrics.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError
from finetune.metrics.summary import step_figures, tenth_mean
from finetune.metrics.trackers import flatten
from finetune.metrics.writers import read_records

# Keys that differ between any two runs without saying anything about them.
_IGNORED_KEYS = ("output_dir", "resume", "resume_force")


@dataclass
class RunFacts:
    """One run directory as read back."""

    path: Path
    config: dict[str, Any]  # flattened: {"optim.lr": 0.0002, ...}
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def load_run(path: Path | str) -> RunFacts:
    """Read a run directory; ConfigError when it holds no metrics.jsonl or config.yaml."""
    path = Path(path)
    metrics, config = path / "metrics.jsonl", path / "config.yaml"
    if not metrics.is_file() and not config.is_file():
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl or config.yaml). "
                          "Give the output_dir of a run, e.g. `finetune report runs/my-run`.")
    flat = flatten(yaml.safe_load(config.read_text(encoding="utf-8")) or {}) \
        if config.is_file() else {}
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) \
        if summary_file.is_file() else {}
    return RunFacts(path=path, config=flat, records=read_records(metrics), summary=summary)


def config_differences(runs: list[RunFacts]) -> list[str]:
    """The config keys whose values are not the same in every run (sorted); a key missing
    from a run counts as a difference."""
    keys = sorted({key for run in runs for key in run.config} - set(_IGNORED_KEYS))
    missing = object()
    return [key for key in keys
            if len({json.dumps(run.config.get(key, missing), default=str) for run in runs}) > 1]


def run_figures(run: RunFacts) -> dict[str, Any]:
    """Final and best loss, throughput, MFU and peak memory of a run."""
    steps = [r for r in run.records if "loss" in r]
    evals = [r for r in run.records if r.get("eval_loss") is not None]
    figures = step_figures(run.records)
    peaks = [r["peak_mem_gb"] for r in steps if r.get("peak_mem_gb") is not None]
    summary = run.summary
    return {
        "steps": steps[-1]["step"] if steps else summary.get("steps", 0),
        "final_loss": summary.get("last_loss", tenth_mean([r["loss"] for r in steps], True)),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else summary.get("eval_loss"),
        "best_eval_loss": min((r["eval_loss"] for r in evals), default=None),
        "best_eval_step": figures["best_eval_step"],
        "tokens_per_s": figures["mean_tokens_per_s"],
        "mfu": figures["mean_mfu"],
        "peak_memory_gb": summary.get("peak_memory_gb", max(peaks, default=None)),
        "completed": bool(summary),
    }


def compare_runs(paths: list[Path | str]) -> dict[str, Any]:
    """The comparison `finetune report` prints (and gives with --json):
    {"config_differences": [keys], "runs": [{"run", "path", "config": {key: value}, figures}]}."""
    runs = [load_run(path) for path in paths]
    differences = config_differences(runs) if len(runs) > 1 else []
    return {
        "config_differences": differences,
        "runs": [{"run": run.name, "path": str(run.path),
                  "config": {key: run.config.get(key) for key in differences},
                  **run_figures(run)} for run in runs],
    }
