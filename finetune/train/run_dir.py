"""The run directory: choosing it, refusing to clobber an existing run, and finding resumes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from finetune.checkpoint import store
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
    """Refuse an output_dir that is a file, or an existing run when no resume was asked for."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir={output_dir} is a file, not a directory. Choose "
                             "another output_dir (or remove the file).")
    if resume is None and output_dir.is_dir() and any(output_dir.iterdir()):
        raise OutputDirError(
            f"output_dir={output_dir} already holds files (a previous run?). Nothing was "
            "changed. Continue that run with resume=auto, or choose a new output_dir.")


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
