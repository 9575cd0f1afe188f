"""What a run prints at its start and at its end.

At the start: the run's title and output directory, the hardware and kernel plan (the text of
`finetune.kernels.format_plan_table`), then the key settings once the model and data are
loaded. At the end: loss, eval loss, steps, tokens, time, throughput, MFU, peak memory, rows cut
or skipped, and where the outputs are. On a terminal these are rich tables; elsewhere the same
facts as plain lines (`family: choice (reason)`, `key: value`), so logs stay greppable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finetune.config.schema import RunConfig
from finetune.metrics.display import plain

_PLAN_LINE = re.compile(r"^(?P<key>[\w ]+): (?P<value>\S+) \((?P<why>.*)\)$")


def plan_rows(plan_text: str) -> list[tuple[str, str, str]]:
    """The lines of `format_plan_table` as (family, choice, why); `hardware` and `env` lines
    keep their whole text as the value."""
    rows = []
    for line in plan_text.splitlines():
        key, _, rest = line.partition(": ")
        match = _PLAN_LINE.match(line)
        if match and key not in ("hardware", "env"):
            rows.append((match["key"], match["value"], match["why"]))
        else:
            rows.append((key, rest, ""))
    return rows


def print_plan(console: Console, *, rich: bool, title: str, plan_text: str) -> None:
    """The first lines of a run: `title` (`finetune RECIPE: output_dir=...`) and the plan."""
    plain(console, title)
    if not rich:
        plain(console, plan_text)
        return
    table = Table(title="hardware and kernel plan", title_justify="left", expand=True)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("choice", style="cyan", no_wrap=True)
    table.add_column("why", style="dim", ratio=1)
    for key, value, why in plan_rows(plan_text):
        if why:
            table.add_row(key, value, why)
        else:
            table.add_row(key, "", value)
    console.print(table)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def key_settings(cfg: RunConfig, *, parameters: tuple[int, int], world_size: int,
                 start_step: int, total_steps: int, data_stats: dict[str, Any],
                 trackers: list[str], display: str) -> list[tuple[str, str]]:
    """The resolved settings a user checks before a run gets going, as (key, value) rows.

    `parameters` is (trainable, total); `data_stats` is DataStats.to_dict(); `display` names
    the console display in use (live or plain).
    """
    trainable, total = parameters
    method = str(cfg.peft.method)
    adapter = "full fine-tune" if method == "none" else f"{method} r={cfg.peft.r}"
    rows = [("model", f"{cfg.model.name_or_path}, {_millions(total)} parameters, "
                      f"{_millions(trainable)} trainable ({adapter}); "
                      f"{world_size} process(es)")]
    data = data_stats
    if data.get("rows") is None:
        size = "streamed (size not known up front)"
    else:
        size = (f"{data['rows']} rows ({data.get('tokens')} tokens, "
                f"{data.get('trained_tokens')} trained)")
    held_out = f", {data['val_rows']} held out" if data.get("val_rows") else ""
    rows.append(("data", f"{data.get('format')}, {size}{held_out}; max_seq_len "
                         f"{data.get('max_seq_len')} ({data.get('max_seq_len_from')}); packing "
                         f"{_packing(data)}"))
    rows.append(("steps", f"{start_step} -> {total_steps}; micro_batch "
                          f"{cfg.trainer.micro_batch_size} x accum {cfg.trainer.grad_accum_steps}"
                          f" x {world_size} process(es); lr {cfg.optim.lr} {cfg.optim.scheduler}"
                          f", warmup {cfg.optim.warmup_steps or cfg.optim.warmup_ratio}"))
    trainer = cfg.trainer
    saves = f"every {trainer.save_every_n_steps} steps" if trainer.save_every_n_steps else "at the end"
    if trainer.save_every_minutes:
        saves += f" and every {trainer.save_every_minutes:g} min"
    evals = f"every {trainer.eval_every_n_steps} steps" if trainer.eval_every_n_steps else "at the end"
    rows.append(("checkpoints", f"{saves}, keep {trainer.keep_last_n or 'all'}; eval {evals}"))
    rows.append(("logging", ", ".join(["metrics.jsonl", f"console ({display})", *trackers])))
    rows.append(("seed", str(cfg.seed)))
    return rows


def print_rows(console: Console, rows: list[tuple[str, str]], *, rich: bool, title: str = "",
               indent: str = "") -> None:
    """(key, value) rows: a two-column table, or `key: value` lines."""
    if not rich:
        for key, value in rows:
            plain(console, f"{indent}{key}: {value}" if key else f"{indent}{value}")
        return
    table = Table(title=title or None, title_justify="left", show_header=False, expand=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(ratio=1)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def summary_rows(summary: dict[str, Any], *, run_dir: Path, final: Path) -> list[tuple[str, str]]:
    """The end-of-run figures of summary.json as (key, value) rows."""
    rows = []
    first, last = summary["first_loss"], summary["last_loss"]
    if first is not None:
        drop = f" ({(1 - last / first):.0%} lower)" if first and last else ""
        partial = "" if summary["loss_history"] == "complete" else (
            " [partial history: metrics.jsonl lost steps from before a resume]")
        rows.append(("loss", f"{first:.4f} (first tenth) -> {last:.4f} (last tenth)"
                             f"{drop}{partial}"))
    if summary["eval_loss"] is not None:
        best = summary.get("best_eval_loss")
        rows.append(("eval loss", f"{summary['eval_loss']:.4f}"
                                  + (f" (best {best:.4f})" if best is not None else "")))
    pairs = f", pairs: {summary['pairs_seen']}" if summary.get("pairs_seen") else ""
    rows.append(("steps", f"{summary['steps']}, trained tokens: {summary['tokens_seen']}{pairs}, "
                          f"time: {summary['elapsed_s']:.1f} s"))
    speed = summary.get("mean_tokens_per_s")
    if speed is not None:
        mfu = summary.get("mean_mfu")
        rows.append(("throughput", f"{speed:,.0f} tokens/s (mean), MFU "
                                   + (f"{mfu:.1%}" if mfu is not None else
                                      "unknown (no peak FLOP/s for this device or precision)")))
    if summary.get("peak_memory_gb") is not None:
        rows.append(("peak memory", f"{summary['peak_memory_gb']:.2f} GiB"))
    data = summary["data"]
    rows.append(("rows", f"{summary['truncated_rows']} truncated, {summary['dropped_rows']} "
                         f"dropped, {summary['skipped_rows']} skipped of "
                         f"{data.get('rows_read', 0)} read (max_seq_len "
                         f"{data.get('max_seq_len')}: {data.get('max_seq_len_from', '')})"))
    for key, label in (("resume_changes", "changed on resume"),
                       ("resume_forced_changes", "FORCED on resume")):
        for resume in summary.get(key) or []:
            rows.append((label, f"at step {resume['step']}: {'; '.join(resume['changes'])}"))
    outputs = [name for name in ("metrics.jsonl", "summary.json", "report.png", "tb", "wandb",
                                 "mlflow.db") if (run_dir / name).exists()]
    rows.append(("outputs", f"{run_dir} ({', '.join(outputs)})"))
    rows.append(("final model", str(final)))
    return rows


def print_end(console: Console, rows: list[tuple[str, str]], *, rich: bool) -> None:
    """The closing block: `done.` and the summary rows."""
    plain(console, "")
    plain(console, "done.")
    print_rows(console, rows, rich=rich, title="", indent="  ")


def _packing(data: dict) -> str:
    if data.get("isolation"):
        return f"on ({data['isolation']} isolation)"
    return "off, padding-free rows" if data.get("padding_free") else "off"
