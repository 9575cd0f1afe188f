"""metrics.jsonl (write, read back, cut back on resume) and the plain console line of a step."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsFile:
    """Appends one JSON object per optimizer step and flushes it, so it can be followed live.

    The file is opened on the first write, so a resume may still cut it back before then.
    Each record is flushed to the OS at once (a crash of the process loses nothing); it is
    forced to disk at most every `sync_every_s` seconds and at close, because an fsync per step
    costs milliseconds on network filesystems.
    """

    def __init__(self, path: Path, sync_every_s: float = 10.0) -> None:
        self.path = path
        self.sync_every_s = sync_every_s
        self._file = None
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= self.sync_every_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def read_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl (step and eval rows, in order); a torn last line (a crash
    mid-write) is left out. An absent file has none."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def step_losses(path: Path) -> list[float]:
    """The training loss of every step recorded in metrics.jsonl, in order (whole run)."""
    return [r["loss"] for r in read_records(path) if "loss" in r]


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop lines past the checkpoint's step so metrics.jsonl has each step once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue
        if step is not None and step <= after_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    """H:MM:SS of a number of seconds (negative counts as 0)."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ConsoleProgress:
    """One line per logged step: step, loss, lr, grad norm, tokens/s, MFU and memory when known,
    and time left. The display where output is not a terminal (CI, SLURM logs)."""

    def __init__(self, total_steps: int, stream=None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.start = time.monotonic()

    def step(self, record: dict, steps_this_session: int) -> None:
        elapsed = time.monotonic() - self.start
        left = self.total_steps - record["step"]
        eta = elapsed / max(steps_this_session, 1) * left
        parts = [f"step {record['step']}/{self.total_steps}", f"loss {record['loss']:.4f}",
                 f"lr {record['lr']:.2e}", f"grad_norm {record['grad_norm']:.3f}",
                 f"{record['tokens_per_s']:.0f} tok/s"]
        if record.get("mfu") is not None:
            parts.append(f"mfu {record['mfu']:.1%}")
        if record.get("peak_mem_gb") is not None:
            parts.append(f"mem {record['peak_mem_gb']:.2f} GiB")
        parts.append(f"eta {format_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
