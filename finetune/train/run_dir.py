"""The run directory: choosing it, refusing to clobber an existing run, and opening the
checkpoint a run resumes from."""

from __future__ import annotations

import logging
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


@dataclass
class Resume:
    """The checkpoint a run continues from, and the config changes it was allowed."""

    checkpoint: store.LoadedCheckpoint
    allowed_changes: list[str] = field(default_factory=list)
    forced_changes: list[str] = field(default_factory=list)


def open_resume(output_dir: Path, resume: str | None, config: dict, *,
                force: bool) -> Resume | None:
    """Load and verify the checkpoint to resume from, and refuse config changes that would
    make it another run (CheckpointError / ConfigError). None: start fresh."""
    path = find_resume_checkpoint(output_dir, resume)
    if path is None:
        return None
    checkpoint = store.load_checkpoint(path)
    allowed, forced = check_resume_compatible(checkpoint.config_yaml, config, force=force,
                                              checkpoint=str(checkpoint.path))
    return Resume(checkpoint, allowed, forced)
