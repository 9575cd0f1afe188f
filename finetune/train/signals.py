"""Preemption: SIGTERM, SIGUSR1 and Ctrl-C ask for a checkpoint at the end of the current step.

SLURM (`--signal`) and Kubernetes send SIGTERM/SIGUSR1 before killing a job. The first signal
sets a flag the loop checks after each optimizer step; all ranks agree on it, save one complete
checkpoint and exit with PREEMPTED_EXIT_CODE. A second signal exits at once: saves are atomic,
so an interrupted save leaves every earlier checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — requeue and resume=auto
# Left in output_dir by a preempted run (removed when the run starts again), so a launcher that
# cannot pass exit codes through (torchrun) can still tell preemption from failure.
PREEMPTED_MARKER = "PREEMPTED"
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionHandler:
    """Installs the handlers on enter and restores the previous ones on exit.

    `last_signal` (class-wide) keeps the latest signal any loop of this process received, even
    when that loop ended at its last step anyway: a sweep stops on it."""

    last_signal: int | None = None

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested is not None:
            os.write(2, f"\nsecond signal ({signal.Signals(signum).name}): exiting now; earlier "
                        "checkpoints are intact.\n".encode())
            os._exit(128 + signum)
        self.requested = signum
        PreemptionHandler.last_signal = signum
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step, saving a "
                    "checkpoint, then exiting (send it again to exit at once).\n".encode())

    def __enter__(self) -> PreemptionHandler:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
