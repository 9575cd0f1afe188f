"""`finetune report RUN_DIR [RUN_DIR...] [--plot OUT.png [--force]] [--json]`: compare runs.

Prints one row per run: the config values that differ between the runs, the final and best
loss, mean tokens/s, mean MFU and peak memory. `--plot` overlays their loss curves in an image
(never replacing an existing file without `--force`); `--json` prints the same comparison as
JSON instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `report`'s arguments."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (a run's output_dir)")
    parser.add_argument("--plot", metavar="OUT.png", type=Path,
                        help="also write the runs' loss curves, overlaid, to this image (.png, "
                             ".pdf, .svg, ...; no extension: .png is added; a folder: "
                             f"{PLOT_NAME} in it)")
    parser.add_argument("--force", action="store_true",
                        help="let --plot replace a file that already exists")
    parser.add_argument("--json", action="store_true",
                        help="print the comparison as JSON instead of a table")


PLOT_NAME = "loss_curves.png"
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


def plot_target(plot: Path, runs: list[str], *, force: bool) -> Path:
    """The file `--plot PLOT` writes: PLOT, PLOT/loss_curves.png for an existing folder, or
    PLOT.png when PLOT has no extension. ConfigError (exit code 2) for a format matplotlib cannot
    write, a folder that does not exist, or a file that exists (a run's own report.png, or any
    other) unless `force`, and where matplotlib (the [plot] extra) is not installed."""
    from finetune.metrics.report import PLOT_INSTALL, plotting_available

    if not plotting_available():
        raise ConfigError(f"--plot {plot}: drawing needs matplotlib, which is not installed "
                          f"here; install it with `{PLOT_INSTALL}`, or leave out --plot for "
                          "the comparison table alone.")
    from matplotlib.backend_bases import FigureCanvasBase

    target = Path(plot).expanduser()
    if target.is_dir():
        target = target / PLOT_NAME
    elif not target.suffix:
        target = target.with_name(target.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if target.suffix[1:].lower() not in formats:
        raise ConfigError(f"--plot {plot}: a plot cannot be written as {target.suffix}; use one "
                          f"of .{', .'.join(sorted(formats))} (e.g. --plot loss.png).")
    if not target.parent.is_dir():
        raise ConfigError(f"--plot {plot}: the folder {target.parent} does not exist; create "
                          "it or choose another path.")
    if target.exists() and not force:
        owner = next((run for run in runs if Path(run).resolve() == target.parent.resolve()),
                     None)
        whose = f", a file of run {owner}" if owner else ""
        raise ConfigError(f"--plot {plot}: {target} already exists{whose}; not overwriting it. "
                          "Choose another path, or add --force to replace it.")
    return target


def _write_plot(runs: list[tuple[str, list]], target: Path) -> None:
    """Draw into a new file beside `target`, then rename it into place: a failure leaves no
    file behind and any earlier `target` as it was. ConfigError (exit code 2) when the folder
    cannot be written, DiskFullError (exit code 1) when the disk is full."""
    from finetune.checkpoint.files import new_temp_path
    from finetune.checkpoint.store import disk_full, is_disk_full
    from finetune.metrics.report import plot_losses

    try:
        tmp = new_temp_path(target.parent, f".{target.stem}-", target.suffix)
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {target}: {exc.strerror or exc} "
                          f"({target.parent}). Choose a path in a folder you can write.") \
            from None
    try:
        plot_losses(runs, tmp)
        os.replace(tmp, target)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(target.parent, None, f"the plot {target.name}",
                            keeps="No file was written.",
                            fix="Free some space, or choose a path on another disk.") from None
        raise


def run(args: argparse.Namespace) -> int:
    """Print the comparison (and write the plot); exit code 0."""
    from finetune.metrics.compare import compare_runs, load_run

    target = (plot_target(args.plot, args.runs, force=args.force)
              if args.plot is not None else None)
    data = compare_runs(args.runs)
    if target is not None:
        labels = [_label(entry) for entry in data["runs"]]
        _write_plot([(label, load_run(path).records)
                     for label, path in zip(labels, args.runs, strict=True)], target)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from finetune.metrics.display import make_console, plain

    console = make_console(sys.stdout)
    console.print(comparison_table(data))
    if not data["config_differences"] and len(data["runs"]) > 1:
        plain(console, "the runs' configs are the same (apart from output_dir)")
    if target is not None:
        plain(console, f"loss curves written to {target}")
    return 0
