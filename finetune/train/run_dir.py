"""The run directory: choosing it, refusing to clobber an existing run, and opening the
checkpoint a run resumes from."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.checkpoint import store
from finetune.checkpoint.compat import check_resume_compatible
from finetune.errors import OutputDirError

logger = logging.getLogger(__name__)


def default_output_dir(recipe: str) -> Path:
    """A fresh timestamped directory under runs/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{recipe}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_output_dir(output_dir: Path, resume: str | None) -> None:
    """Refuse an output_dir that is a file, that cannot be written, or that holds an existing
    run when no resume was asked for. Leaves the file system as it found it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir={output_dir} is a file, not a directory. Choose "
                             "another output_dir (or remove the file).")
    if resume is None and output_dir.is_dir() and any(output_dir.iterdir()):
        raise OutputDirError(
            f"output_dir={output_dir} already holds files (a previous run?). Nothing was "
            "changed. Continue that run with resume=auto, or choose a new output_dir.")
    if os.environ.get("RANK", "0") == "0":  # one probe per run: ranks would race on it
        _check_writable(output_dir)


def _check_writable(output_dir: Path) -> None:
    """Create the directory and a probe file in it, then remove what was created."""
    missing = [p for p in [output_dir, *output_dir.parents] if not p.exists()]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise OutputDirError(
            f"output_dir={output_dir} cannot be written ({exc.strerror or exc}). Nothing was "
            "changed. Choose a directory you can write to, e.g. output_dir=runs/my-run.") from None
    finally:
        for path in missing:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()


class FreshRunDir:
    """Restores a fresh run's directory when the run fails before its first step, so that the
    same command can run again: a directory that did not exist is removed, one that was empty
    is emptied. A resumed run's directory is never touched."""

    def __init__(self, output_dir: Path, resume: str | None) -> None:
        self.output_dir = output_dir
        self.existed = output_dir.exists()
        self.fresh = resume is None or not (self.existed and any(output_dir.iterdir()))

    def restore(self) -> None:
        if not self.fresh or not self.output_dir.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for child in self.output_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def start_run_files(output_dir: Path, step: int, *, config_yaml: str, kernel_plan: dict) -> bool:
    """Rank 0, once the run (or its resume) is set up: move later checkpoints of an abandoned
    trajectory aside, cut metrics.jsonl back to `step`, write config.yaml and kernel_plan.json.

    Returns False when metrics.jsonl lacks some of the steps up to `step` (deleted or damaged):
    the loss history before the resume is then partial, and a warning says so.
    """
    from finetune.checkpoint.files import write_json
    from finetune.metrics.writers import truncate_metrics

    store.abandon_after(output_dir, step)
    metrics = output_dir / "metrics.jsonl"
    truncate_metrics(metrics, step)
    truncate_metrics(output_dir / "samples.jsonl", step)  # completions sampled during training
    have = _logged_steps(metrics)
    complete = have >= step
    if not complete:
        logger.warning("metrics.jsonl holds %d of the %d steps before this resume (deleted or "
                       "damaged); the loss history and the summary's loss change cover only "
                       "the steps it holds", have, step)
    (output_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    write_json(output_dir / "kernel_plan.json", kernel_plan)
    return complete


def _logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = set()
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            steps.add(record.get("step"))
    return len(steps)


def find_resume_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (resume=auto with none found)."""
    if resume is None:
        return None
    if resume == "auto":
        found = store.latest_complete_checkpoint(output_dir)
        if found is None:
            logger.info("resume=auto: no complete checkpoint in %s; starting fresh", output_dir)
        return found
    return Path(resume)


@dataclass
class Resume:
    """The checkpoint a run continues from, and the config changes it was allowed."""

    checkpoint: store.LoadedCheckpoint
    allowed_changes: list[str] = field(default_factory=list)
    forced_changes: list[str] = field(default_factory=list)


def open_resume(output_dir: Path, resume: str | None, config: dict, *,
                force: bool, world_size: int | None = None) -> Resume | None:
    """Load and verify the checkpoint to resume from, and refuse config changes that would
    make it another run (CheckpointError / ConfigError). None: start fresh. `world_size`: the
    resuming run's processes, compared with those that wrote the checkpoint."""
    path = find_resume_checkpoint(output_dir, resume)
    if path is None:
        return None
    checkpoint = store.load_checkpoint(path)
    allowed, forced = check_resume_compatible(
        checkpoint.config_yaml, config, force=force, checkpoint=str(checkpoint.path),
        saved_world_size=checkpoint.state.progress.get("world_size"), world_size=world_size)
    return Resume(checkpoint, allowed, forced)
