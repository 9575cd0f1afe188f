"""`finetune report RUN_DIR [RUN_DIR...] [--plot OUT.png] [--json]`: compare runs.

Prints one row per run: the config values that differ between the runs, the final and best
loss, mean tokens/s, mean MFU and peak memory. `--plot` overlays their loss curves in a PNG;
`--json` prints the same comparison as JSON instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `report`'s arguments."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (a run's output_dir)")
    parser.add_argument("--plot", metavar="OUT.png", type=Path,
                        help="also write the runs' loss curves, overlaid, to this PNG")
    parser.add_argument("--json", action="store_true",
                        help="print the comparison as JSON instead of a table")


MAX_KEY_COLUMNS = 4
MAX_LEGEND_KEYS = 2


def _number(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _label(run: dict[str, Any]) -> str:
    """A run's legend entry: its name, with the values that set it apart when there are few
    (the table has them all)."""
    config = run["config"]
    if not config or len(config) > MAX_LEGEND_KEYS:
        return run["run"]
    return f"{run['run']} ({', '.join(f'{k}={v}' for k, v in config.items())})"


def comparison_table(data: dict[str, Any]) -> Any:
    """The comparison as a rich Table: a run per row, differing config values, then figures."""
    from rich.table import Table

    differences = data["config_differences"]
    table = Table(title="runs", title_justify="left")
    table.add_column("run", style="bold")
    # A column per differing key while they fit; beyond that one column of key=value lines.
    columns = differences if len(differences) <= MAX_KEY_COLUMNS else []
    for key in columns:
        table.add_column(key, style="cyan", overflow="fold")
    if differences and not columns:
        table.add_column("config differences", style="cyan")
    for name in ("steps", "final loss", "final eval", "best eval", "tokens/s", "MFU",
                 "peak mem (GiB)"):
        table.add_column(name, justify="right")
    for run in data["runs"]:
        best = _number(run["best_eval_loss"], ".4f")
        if run["best_eval_step"] is not None:
            best += f" @{run['best_eval_step']}"
        config = ([str(run["config"][key]) for key in columns] if columns else
                  ["\n".join(f"{k}={v}" for k, v in run["config"].items())] if differences
                  else [])
        table.add_row(
            run["run"] + ("" if run["completed"] else " (not finished)"), *config,
            str(run["steps"]), _number(run["final_loss"], ".4f"),
            _number(run["final_eval_loss"], ".4f"), best,
            _number(run["tokens_per_s"], ",.0f"),
            "-" if run["mfu"] is None else f"{run['mfu']:.1%}",
            _number(run["peak_memory_gb"], ".2f"))
    return table


def run(args: argparse.Namespace) -> int:
    """Print the comparison (and write the plot); exit code 0."""
    from finetune.metrics.compare import compare_runs, load_run

    data = compare_runs(args.runs)
    if args.plot is not None:
        from finetune.metrics.report import plot_losses

        labels = [_label(entry) for entry in data["runs"]]
        plot_losses([(label, load_run(path).records)
                     for label, path in zip(labels, args.runs, strict=True)], args.plot)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from finetune.metrics.display import make_console, plain

    console = make_console(sys.stdout)
    console.print(comparison_table(data))
    if not data["config_differences"] and len(data["runs"]) > 1:
        plain(console, "the runs' configs are the same (apart from output_dir)")
    if args.plot is not None:
        plain(console, f"loss curves written to {args.plot}")
    return 0
