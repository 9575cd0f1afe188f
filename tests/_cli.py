"""Run the `finetune` command as a user would, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `finetune` command in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def read_step_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of metrics.jsonl (eval records left out)."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# A fast configuration for tests that only need a few real steps.
QUICK = ["trainer.max_steps=6", "trainer.micro_batch_size=4", "data.max_seq_len=64",
         "trainer.eval_every_n_steps=0", "trainer.save_every_n_steps=0",
         "trainer.eval_max_batches=2"]
