"""Preemption signals: the first asks for a save, a second exits at once."""

from __future__ import annotations

import signal
import subprocess
import sys

SCRIPT = """
import os, signal, sys, time
from finetune.train.signals import PreemptionHandler
with PreemptionHandler() as handler:
    os.kill(os.getpid(), signal.{first})
    time.sleep(0.2)
    print("requested", handler.requested, flush=True)
    if {twice}:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not reached", flush=True)
"""


def _run(first: str, twice: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(first=first, twice=twice)],
                          capture_output=True, text=True, timeout=60)


def test_first_signal_only_sets_the_flag() -> None:
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        result = _run(name, twice=False)
        assert result.returncode == 0, result.stderr
        assert f"requested {int(getattr(signal, name))}" in result.stdout
        assert "saving a checkpoint" in result.stderr


def test_second_signal_exits_at_once() -> None:
    result = _run("SIGUSR1", twice=True)
    assert result.returncode == 128 + signal.SIGTERM
    assert "not reached" not in result.stdout
    assert "exiting now" in result.stderr
