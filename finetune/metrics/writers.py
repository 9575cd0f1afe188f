"""Where step metrics go: metrics.jsonl (always), the console, and optionally W&B."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from finetune.config.schema import LoggerConfig

logger = logging.getLogger(__name__)


class MetricsFile:
    """Appends one JSON object per optimizer step and flushes it, so it can be followed live.

    The file is opened on the first write, so a resume may still cut it back before then.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def write(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def step_losses(path: Path) -> list[float]:
    """The training loss of every step recorded in metrics.jsonl, in order (whole run)."""
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [r["loss"] for r in records if "loss" in r]


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


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ConsoleProgress:
    """One line per logged step: step, loss, lr, tokens/s and time left."""

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
        parts.append(f"eta {_fmt_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class WandbLogger:
    """Mirrors metrics to Weights & Biases. The API key comes from `wandb login` or the
    environment and is never written anywhere by finetune."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict,
                 resume_id: str | None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name, mode=cfg.mode,
            tags=list(cfg.tags), dir=str(run_dir), config=config,
            id=resume_id, resume="allow" if resume_id else None,
        )
        self.run_id = self.run.id

    def log(self, record: dict) -> None:
        clean = {k: v for k, v in record.items()
                 if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))}
        self._wandb.log(clean, step=record["step"])

    def finish(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, int | float | str):
                self.run.summary[key] = value
        self._wandb.finish()
