"""The run directory: choosing it, one writer at a time (`RunDirLock`), refusing to clobber an
existing run, and opening the checkpoint a run resumes from."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.checkpoint import store
from finetune.checkpoint.compat import check_resume_compatible
from finetune.errors import OutputDirError

logger = logging.getLogger(__name__)

# The lock file a run holds in its directory; hidden, and not counted as a file of the run.
LOCK_NAME = ".finetune-run.lock"
# Set by a launcher that holds the lock for the ranks it starts: the launcher's PID.
LOCK_OWNER_ENV = "FINETUNE_RUN_LOCK_OWNER"


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
    _refuse_a_file(output_dir)
    if resume is None and holds_files(output_dir):
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
        raise _unwritable(output_dir, exc) from None
    finally:
        for path in missing:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()


def _refuse_a_file(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir={output_dir} is a file, not a directory. Choose "
                             "another output_dir (or remove the file).")


def _unwritable(output_dir: Path, exc: OSError) -> OutputDirError:
    return OutputDirError(
        f"output_dir={output_dir} cannot be written ({exc.strerror or exc}). Nothing was "
        "changed. Choose a directory you can write to, e.g. output_dir=runs/my-run.")


def holds_files(output_dir: Path) -> bool:
    """Whether the directory holds anything besides a run's lock file."""
    return output_dir.is_dir() and any(p.name != LOCK_NAME for p in output_dir.iterdir())


class RunDirLock:
    """One writer per run directory: an OS-level lock (flock) on OUTPUT_DIR/.finetune-run.lock,
    held from before the directory is checked until the run exits.

    `acquire` creates the directory if needed and raises OutputDirError (exit code 2) naming
    the PID, host, start time and command of the run that holds it. The kernel releases the
    lock however the process ends (kill -9 included); `release` also removes the lock file and
    the directories `acquire` created while they are empty, so a refused or failed fresh run
    leaves the file system as it found it. A lock file left by a killed run holds no lock.

    On a file system without flock (some network mounts), the run goes on unprotected and a
    warning says so. A launcher that holds the lock for its ranks puts its PID in
    FINETUNE_RUN_LOCK_OWNER; a rank finding the lock held by that PID goes on without it.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.path = output_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        _refuse_a_file(self.output_dir)
        self._created = [p for p in [self.output_dir, *self.output_dir.parents]
                         if not p.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.output_dir, exc) from None
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._remove_created()
                raise _unwritable(self.output_dir, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _held_for_us(holder):
                    return
                raise self._refusal(holder) from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP, ENOSYS: no flock on this mount
                os.close(fd)
                with contextlib.suppress(OSError):
                    self.path.unlink()
                logger.warning(
                    "output_dir=%s: this file system refused a lock (%s), so nothing stops a "
                    "second run from writing into this directory at the same time. Make sure "
                    "only one run uses it, or use a directory on a file system with flock "
                    "(local disks, NFS; Lustre mounted with -o flock).",
                    self.output_dir, exc.strerror or exc)
                return
            if not _same_file(fd, self.path):  # its holder removed it as we opened it
                os.close(fd)
                continue
            self._fd = fd
        self._write_holder()

    def release(self) -> None:
        """Remove the lock file (while still holding it) and let go of the lock."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if _same_file(self._fd, self.path):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in self._created:  # innermost first; only while empty
            with contextlib.suppress(OSError):
                path.rmdir()
        self._created = []

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join(Path(sys.argv[0]).name if i == 0 else a
                                      for i, a in enumerate(sys.argv))}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def _refusal(self, holder: dict) -> OutputDirError:
        who = (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}" if holder else "a process whose details could "
               "not be read")
        command = f" (`{holder['command']}`)" if holder.get("command") else ""
        return OutputDirError(
            f"output_dir={self.output_dir} is in use by another run: {who}{command}. Two runs "
            "in one directory would overwrite each other's checkpoints, metrics and final "
            "model, so nothing was changed. Wait for that run to end or stop it (then "
            "resume=auto continues it), or choose another output_dir.")


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _held_for_us(holder: dict) -> bool:
    """The lock is held by the launcher that started this process (its PID in the env)."""
    owner = os.environ.get(LOCK_OWNER_ENV)
    return bool(owner) and str(holder.get("pid")) == owner \
        and holder.get("host") == socket.gethostname()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class FreshRunDir:
    """Restores a fresh run's directory when the run fails before its first step, so that the
    same command can run again: a directory that did not exist is removed, one that was empty
    is emptied. A resumed run's directory is never touched."""

    def __init__(self, output_dir: Path, resume: str | None) -> None:
        self.output_dir = output_dir
        self.existed = output_dir.exists()
        self.fresh = resume is None or not holds_files(output_dir)

    def restore(self) -> None:
        if not self.fresh or not self.output_dir.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for child in self.output_dir.iterdir():
            if child.name == LOCK_NAME:  # the lock's holder removes it
                continue
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
