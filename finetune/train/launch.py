"""Start a run on several processes of this machine with torchrun (torch.distributed.run).

`finetune run RECIPE --nproc N` calls `launch_processes`; each rank then runs the plain
`finetune run` command with the same overrides.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER


def launch_processes(nproc: int, recipe: str, overrides: list[str], output_dir: Path) -> int:
    """Run the recipe on `nproc` processes with torchrun; return the run's exit code.

    torchrun runs in its own process group, so a terminal's Ctrl-C reaches only this process,
    which forwards one SIGTERM: each rank then finishes its step and the ranks save one
    checkpoint together. torchrun reports a rank's exit 75 as a plain failure, so the
    preemption marker the run leaves in output_dir restores the documented exit code.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "finetune.cli", "run", recipe, *overrides]
    proc = subprocess.Popen(command, start_new_session=True)

    def forward(_signum: int, _frame: object) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and (output_dir / PREEMPTED_MARKER).is_file():
        return PREEMPTED_EXIT_CODE
    return code
