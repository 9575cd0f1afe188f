"""Shared timing and output: each section runs under its own hard time budget and the run's,
keeps what it measured when it fails or runs out, and is written out (the JSON report, and on a
GPU the dated section of docs/hardware-validation.md) as soon as it ends."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class Skip(Exception):
    """A section that does not apply to this machine; the message says why."""


class SectionTimeout(Exception):
    """A section ran past its budget."""


@contextlib.contextmanager


def hard_deadline(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread once `seconds` have passed. A running kernel
    is not interrupted; the exception arrives as soon as control returns to Python."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past its {seconds:.0f}s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The whole run's wall-clock budget; sections that would start too late are skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(report: dict[str, Any], name: str, budget: Budget, seconds: float,
                fn: Callable[[dict[str, Any]], None]) -> None:
    """Run `fn(results)` into report[name] with at most `seconds` (and what the run has left).

    `fn` fills `results` as it goes, so a failure or a timeout keeps what was measured. It
    raises Skip when the section does not apply here. Never raises.
    """
    results: dict[str, Any] = {}
    allowed = min(seconds, budget.left())
    if allowed < min(seconds, 5.0):
        report[name] = {"status": f"skipped: {budget.left():.0f}s of the run's budget left"}
        return
    started = time.monotonic()
    try:
        with hard_deadline(allowed):
            fn(results)
        status = "ok"
    except Skip as why:
        status = f"skipped: {why}"
    except SectionTimeout as why:
        status = f"timed out: {why} (partial results kept)"
    except Exception as exc:  # a section's failure is a finding, not the end of the run
        status = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        results["traceback"] = traceback.format_exc(limit=6)
    report[name] = {"status": status, **results,
                    "seconds": round(time.monotonic() - started, 1)}


def needs(*packages: str) -> None:
    """Raise Skip naming the distributions of `packages` (import names) that are missing here.
    An offline node may lack finetune's configuration and data dependencies; a section that
    needs one says so instead of failing."""
    from finetune.dependencies import DISTRIBUTION_OF_MODULE

    missing = [DISTRIBUTION_OF_MODULE.get(name, name) for name in packages
               if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f"needs {', '.join(missing)} (not installed here; see docs/distributed.md, "
                   "\"Offline cluster\")")


def skipped_checks(report: dict[str, Any]) -> list[str]:
    """Every check this machine skipped, with why: sections, and per-candidate refusals."""
    found = []
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        status = str(section.get("status", ""))
        if status.startswith("skipped"):
            found.append(f"{name}: {status.removeprefix('skipped: ')}")
        for candidate, why in (section.get("unsupported") or {}).items():
            found.append(f"{name}/{candidate}: {why}")
    return found


def validation_section(report: dict[str, Any], json_path: Path) -> str:
    """The dated Markdown section appended to docs/hardware-validation.md: what ran, and only
    figures this run measured."""
    hw = report.get("plan", {}).get("plan", {}).get("hardware", {})
    title = (f"### {report['date']}: {hw.get('name', 'unknown device')} ({hw.get('arch', '?')}), "
             f"torch {report.get('versions', {}).get('torch')}")
    lines = [title, "", f"Report: `{json_path.name}` (scripts/gpu_check.py, "
             f"{report['wall_s']:.0f} s).", "", "| section | status | figures |", "|---|---|---|"]
    figures = {
        "gemm": lambda s: f"{s.get('tflops')} TFLOP/s bf16 ({s.get('fraction_of_peak')} of peak)",
        "lora": lambda s: (f"{s.get('median_tokens_per_s')} tok/s, MFU {s.get('median_mfu')}, "
                           f"peak {s.get('peak_memory_gb')} GB"),
        "step": lambda s: "; ".join(
            f"{name} {r.get('tokens_per_s')} tok/s, MFU {r.get('mfu')}, "
            f"peak {r.get('peak_gib')} GiB"
            for name, r in s.get("runs", {}).items() if isinstance(r, dict)),
        "syncs": lambda s: f"{s.get('syncs_per_step')} host syncs per optimizer step",
        "tf32": lambda s: f"planned {s.get('planned')}, consistent {s.get('consistent')}",
        "resume": lambda s: (f"losses bitwise equal {s.get('bitwise_equal')}, adapters "
                             f"{s.get('adapters_bitwise_equal')} (the device repeats a run bit "
                             f"for bit: {s.get('device_repeats_bitwise')})"),
        "fsdp2": lambda s: (f"{s.get('backend')}, losses within {s.get('max_rel_diff')} "
                            f"(relative) of unsharded, peak {s.get('peak_gib')} GiB"),
        "lora_forward": lambda s: (f"fused/peft step {s.get('speedup')}x, grad cosine "
                                   f"{s.get('grad_cosine')}, peak {s.get('peak_gib_fused')} vs "
                                   f"{s.get('peak_gib_peft')} GiB"),
    }
    for name, section in report.items():
        if isinstance(section, dict) and "status" in section:
            text = figures[name](section) if name in figures and section["status"] == "ok" else ""
            lines.append(f"| {name} | {section['status'][:80]} | {text} |")
    return "\n".join(lines) + "\n"


class ReportWriter:
    """Writes the report after every section: the JSON file, replaced atomically, and, when
    `doc` is given, the run's dated section of the validation page (the page as it was before
    the run, plus this run's section so far). A run cut off from outside keeps every section
    that ended."""

    def __init__(self, report: dict[str, Any], json_path: Path, doc: Path | None,
                 started: float) -> None:
        self.report, self.json_path, self.doc, self.started = report, json_path, doc, started
        self.doc_before = doc.read_text() if doc is not None and doc.exists() else None

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.report["skipped"] = skipped_checks(self.report)
        _replace(self.json_path, json.dumps(self.report, indent=2, default=str) + "\n")
        if self.doc is not None:
            before = (self.doc_before or "").rstrip("\n") + "\n\n"
            _replace(self.doc, before + validation_section(self.report, self.json_path))


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
