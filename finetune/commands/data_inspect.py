"""`finetune data inspect RECIPE [OVERRIDES...] [--json]`: the data a run would train on.

Composes the run config, loads the model's tokenizer and builds the data exactly as a run
would, then shows the detected format, row and token counts (total and trained), what was
skipped, truncated or dropped, the packing efficiency, and one example with the trained tokens
in [[ ]]. With packing and kernels.attention=auto it assumes sdpa (the plan is not run here).

Exit status: 0 on success, 2 on a bad option, config or data (a FinetuneError's exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.errors import FinetuneError

JSON_KEYS = ("format", "rows", "tokens", "trained_tokens", "skipped_rows", "truncated_rows",
             "packed_sequences", "packing_efficiency")
EXTRA_KEYS = ("dropped_rows", "val_rows", "rows_read", "skip_reasons", "max_seq_len",
              "max_seq_len_from", "isolation", "padding_free", "template", "streaming",
              "sources")


def mark_trained(tokenizer: Any, ids: np.ndarray, trained: np.ndarray) -> str:
    """The example's text with every run of trained tokens wrapped in [[ ]]."""
    parts, start = [], 0
    ids, trained = np.asarray(ids), np.asarray(trained, dtype=bool)
    while start < len(ids):
        end = start
        while end < len(ids) and trained[end] == trained[start]:
            end += 1
        text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False)
        parts.append(f"[[{text}]]" if trained[start] else text)
        start = end
    return "".join(parts)


def inspect_data(cfg: DataConfig, tokenizer: Any, *, attention: str = "auto", seed: int = 0,
                 micro_batch_size: int = 1,
                 max_context: int | None = None,
                 pairs: bool = False) -> tuple[dict[str, Any], str]:
    """Build the data and describe it: (report dict, human-readable text). `max_context` is
    the model's context length (the bound of data.max_seq_len=auto)."""
    attention = "sdpa" if attention == "auto" else attention
    data = build_data(cfg, tokenizer, attention=attention, seed=seed,
                      micro_batch_size=micro_batch_size, max_context=max_context, pairs=pairs)
    stats = data.stats.to_dict()
    report = {key: stats[key] for key in JSON_KEYS + EXTRA_KEYS}
    preview = data.preview(1)
    example = mark_trained(tokenizer, *preview[0]) if preview else None
    report["example"] = example
    return report, format_report(report)


def _count(value: Any) -> str:
    return "unknown until read (streaming)" if value is None else f"{value:,}"


def format_report(report: dict[str, Any]) -> str:
    lines = [f"format:             {report['format']}",
             f"training rows:      {_count(report['rows'])}"
             + (f" (+{report['val_rows']:,} held out)" if report.get("val_rows") else ""),
             f"tokens:             {_count(report['tokens'])}",
             f"trained tokens:     {_count(report['trained_tokens'])}",
             f"skipped rows:       {report['skipped_rows']:,}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in report['skip_reasons'].items())})"
                if report.get("skip_reasons") else ""),
             f"truncated rows:     {report['truncated_rows']:,}",
             f"dropped rows:       {report['dropped_rows']:,}",
             f"max_seq_len:        {report['max_seq_len']} ({report['max_seq_len_from']})"]
    if report["packed_sequences"] is not None:
        lines.append(f"packed sequences:   {report['packed_sequences']:,} of "
                     f"{report['max_seq_len']} tokens, {report['packing_efficiency']:.1%} full "
                     f"(isolation: {report['isolation']})")
    else:
        lines.append("packing:            off" + (", padding-free rows (data.padding_free)"
                                                  if report.get("padding_free") else ""))
    for source in report["sources"]:
        lines.append(f"source:             {source['path']} ({source['format']})")
    if report.get("example") is not None:
        lines += ["", "first example (trained tokens in [[ ]]):", report["example"]]
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune data inspect",
        description="Show the data a recipe would train on, after templating and packing.")
    parser.add_argument("recipe", help="recipe name or config file, e.g. lora_sft")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.packing=true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def main(argv: list[str]) -> int:
    """Run `finetune data inspect` with `argv` (the arguments after `inspect`)."""
    try:
        args = _build_parser().parse_intermixed_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2, already printed)
        return int(exc.code or 0)
    from finetune.config.compose import compose_run_config
    from finetune.models import context_length, load_model_config, load_tokenizer
    from finetune.train.recipe import load_recipe
    from finetune.train.setup import planned_attention

    try:
        run = compose_run_config(args.recipe, args.overrides)
        tokenizer = load_tokenizer(run.model)
        attention = planned_attention(run.kernels, packing=run.data.packing)
        report, text = inspect_data(run.data, tokenizer, attention=attention,
                                    seed=run.seed, micro_batch_size=run.trainer.micro_batch_size,
                                    max_context=context_length(load_model_config(run.model)),
                                    pairs=load_recipe(run.recipe).pairs)
    except FinetuneError as exc:  # DataError and ConfigError among them
        print(f"finetune data inspect: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({key: report[key] for key in JSON_KEYS + EXTRA_KEYS}, indent=2))
    else:
        print(text)
    return 0
