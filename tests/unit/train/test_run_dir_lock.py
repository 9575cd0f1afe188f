"""One writer per run directory: the lock a run holds, who it names when it refuses, what it
leaves behind, and how it behaves after a kill -9 or on a file system without flock."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from finetune.errors import OutputDirError
from finetune.train import run_dir as run_dir_module
from finetune.train.run_dir import (
    LOCK_NAME,
    LOCK_OWNER_ENV,
    FreshRunDir,
    RunDirLock,
    check_output_dir,
)


def _hold(run: Path, ready) -> None:
    RunDirLock(run).acquire()
    ready.set()
    time.sleep(120)


class _Holder:
    """Another process (forked: no second import of torch) holding the run's lock."""

    def __init__(self, run: Path) -> None:
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        self.process = ctx.Process(target=_hold, args=(run, ready), daemon=True)
        self.process.start()
        assert ready.wait(30)
        self.pid = self.process.pid

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _Holder(run)
    try:
        with pytest.raises(OutputDirError) as refused:
            RunDirLock(run).acquire()
        message = str(refused.value)
        assert f"PID {proc.pid} on host {socket.gethostname()}" in message
        assert "in use by another run" in message and "nothing was changed" in message
        assert refused.value.exit_code == 2
    finally:
        proc.kill()


def test_kill_9_releases_the_lock_and_its_file_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _Holder(run)
    proc.kill()
    assert (run / LOCK_NAME).is_file()  # left behind, but no process holds it
    with RunDirLock(run):
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()


def test_release_leaves_the_file_system_as_found(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b" / "run"
    with RunDirLock(new):
        assert (new / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("{}\n")
    with RunDirLock(old):
        pass
    assert sorted(p.name for p in old.iterdir()) == ["metrics.jsonl"]


def test_the_lock_file_is_not_a_file_of_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    claim = FreshRunDir(run, "auto")
    with RunDirLock(run):
        check_output_dir(run, None)  # an empty run directory but for the lock: accepted
        assert claim.fresh
        (run / "config.yaml").write_text("x")
        with pytest.raises(OutputDirError, match="already holds files"):
            check_output_dir(run, None)
        claim.restore()
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]  # the holder removes it
    assert run.is_dir() and not any(run.iterdir())


def test_a_rank_goes_on_under_the_lock_its_launcher_holds(tmp_path: Path,
                                                          monkeypatch) -> None:
    run = tmp_path / "run"
    proc = _Holder(run)
    try:
        monkeypatch.setenv(LOCK_OWNER_ENV, str(proc.pid))
        with RunDirLock(run):
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
        monkeypatch.setenv(LOCK_OWNER_ENV, str(proc.pid + 1))  # another launcher's run
        with pytest.raises(OutputDirError, match=f"PID {proc.pid} "):
            RunDirLock(run).acquire()
    finally:
        proc.kill()


def test_a_lock_file_replaced_while_waiting_is_locked_again(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The holder removes the lock file as it exits; a run that opened the old file must not
    hold a lock nobody else sees."""
    run = tmp_path / "run"
    run.mkdir()
    opened: list[int] = []
    real_flock = run_dir_module.fcntl.flock

    def flock(fd: int, op: int) -> None:
        real_flock(fd, op)
        if not opened:  # the first file it locked is unlinked and replaced under it
            opened.append(fd)
            (run / LOCK_NAME).unlink()
            (run / LOCK_NAME).write_text("{}")

    monkeypatch.setattr(run_dir_module.fcntl, "flock", flock)
    with RunDirLock(run) as lock:
        assert os.fstat(lock._fd).st_ino == os.stat(run / LOCK_NAME).st_ino
        assert len(opened) == 1 and lock._fd is not None


def test_without_flock_the_run_goes_on_and_says_it_is_unprotected(
        tmp_path: Path, monkeypatch, caplog) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir_module.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    with caplog.at_level("WARNING"), RunDirLock(run):
        pass
    assert "nothing stops a second run" in caplog.text and "No locks available" in caplog.text
    assert not run.exists()


def test_an_unwritable_place_is_refused_as_before() -> None:
    with pytest.raises(OutputDirError, match="cannot be written"):
        RunDirLock(Path("/proc/finetune-run")).acquire()


def test_the_holder_is_written_for_whoever_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunDirLock(run):
        holder = json.loads((run / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["command"] and holder["started"][:4].isdigit()
