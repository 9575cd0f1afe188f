"""The command line: parse, pick the sizes, run the sections in order of value, each under its
budget, writing the report after each one."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .context import CPU, GPU, ROOT, Context, finetune_pythonpath

VALIDATION_DOC = ROOT / "docs" / "hardware-validation.md"
# The whole run on a GPU: 5 minutes with the first import and the plan's self-checks.
BUDGET_S = 280.0
# --dry-run on a shared CPU: no section is cut short, so every one is exercised.
DRY_RUN_BUDGET_S = 900.0
DRY_RUN_SCALE = 3.0
# (section, module, seconds on a GPU), most valuable first: what a step costs and why, then
# the correctness checks, then the end-to-end runs. Sections that start after the run's budget
# is spent are skipped and say so.
SECTIONS: tuple[tuple[str, str, float], ...] = (
    ("versions", "machine", 5), ("plan", "machine", 25),
    ("step", "step", 100), ("syncs", "syncs", 15), ("op_profile", "op_profile", 15),
    ("leak", "leak", 25), ("selfcheck", "selfcheck", 15), ("sdpa_backend", "sdpa_backend", 8),
    ("loss_parity", "parity", 15), ("lora_forward", "parity", 15), ("resume", "resume", 15),
    ("fsdp2", "fsdp2", 15), ("adamw", "numerics", 10),
    ("tf32", "numerics", 2), ("memory", "memory", 20), ("gemm", "memory", 8),
    ("liger", "parity", 15), ("lora", "lora_run", 90), ("multi_gpu", "multi_gpu", 60),
)


def section_function(name: str, module: str) -> Callable[[Context, dict[str, Any]], None]:
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{module}"), f"section_{name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py",
                                     description="Measure and prove the kernel plan on a GPU.")
    parser.add_argument("--out", type=Path, help="the JSON report (default: gpu_check-DATE.json)")
    parser.add_argument("--budget-s", type=float,
                        help=f"wall-clock budget in seconds (default {BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every section on CPU with tiny shapes; no doc")
    parser.add_argument("--skip-lora", action="store_true", help="skip the `finetune run` section")
    parser.add_argument("--only", help="comma-separated sections to run (versions and plan always)")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not write to docs/hardware-validation.md")
    parser.add_argument("--doc", type=Path, default=VALIDATION_DOC, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    pythonpath = finetune_pythonpath()
    if args.allreduce_worker:
        from .multi_gpu import allreduce_worker

        return allreduce_worker()

    import torch

    from .runner import Budget, ReportWriter, run_section

    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        print("gpu_check: no CUDA/ROCm device here; use --dry-run to exercise the script on CPU",
              file=sys.stderr)
        return 2
    ctx = Context(args, GPU if on_gpu else CPU, "cuda" if on_gpu else "cpu",
                  torch.bfloat16 if on_gpu else torch.float32, pythonpath=pythonpath)
    scale = 1.0 if on_gpu else DRY_RUN_SCALE
    budget_s = args.budget_s or (BUDGET_S if on_gpu else DRY_RUN_BUDGET_S)
    budget = Budget(budget_s - (time.monotonic() - started))  # the imports count too
    date = datetime.date.today().isoformat()
    report: dict[str, Any] = {"date": date, "dry_run": args.dry_run, "budget_s": budget_s}
    out_path = args.out or Path(f"gpu_check-{date}.json")
    writer = ReportWriter(report, out_path, args.doc if on_gpu and not args.no_doc else None,
                          started)
    only = set(args.only.split(",")) if args.only else None
    for name, module, seconds in SECTIONS:
        if only is not None and name not in only | {"versions", "plan"}:
            continue
        if ctx.plan is None and name not in ("versions", "plan"):
            report[name] = {"status": "skipped: no kernel plan (the plan section failed)"}
        else:
            allowed = min(seconds * scale, budget.left())
            ends = time.monotonic() + allowed
            ctx.time_left = lambda ends=ends: ends - time.monotonic()
            run_section(report, name, budget, seconds * scale,
                        lambda out, n=name, m=module: section_function(n, m)(ctx, out))
        writer.write()
        print(f"gpu_check: {name}: {report[name]['status']}", file=sys.stderr, flush=True)
    writer.write()
    print(f"gpu_check: report written to {out_path} ({report['wall_s']:.0f} s)", file=sys.stderr)
    if writer.doc is not None:
        print(f"gpu_check: wrote this run's section to {writer.doc}", file=sys.stderr)
    return 0
