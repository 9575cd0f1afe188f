"""Start a run's processes, and give each process its rank whichever launcher started it.

`finetune run RECIPE --nproc N [--nnodes M ...]` calls `launch_processes`, which runs torchrun
(torch.distributed.run) on this machine; every rank then runs the plain `finetune run` command
with the same overrides. Processes that another launcher started need nothing from here when it
sets RANK (torchrun, accelerate launch); `srun` alone sets only SLURM_* variables, which
`adopt_slurm_rank` maps to the ones torch.distributed reads. Under submitit (the SLURM sweep
launcher), `SchedulerPreemption` turns submitit's preemption signal into the run's own
checkpoint-then-exit, and hands the requeue back to submitit afterwards.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

from finetune.errors import ConfigError
from finetune.train.rendezvous import Nodes, launcher_env, read_report, rendezvous_error
from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, PreemptionHandler

logger = logging.getLogger(__name__)

# The module each rank runs: the `finetune` command, wrapped so that torchrun's failure summary
# shows the exception that ended a rank (torch.distributed.elastic's error file).
RANK_ENTRY_POINT = "finetune.commands.run"
# torch.distributed.run, with a failed rendezvous reported in one paragraph (see that module)
TORCHRUN_MODULE = "finetune.train.rendezvous"


def check_nodes(nodes: Nodes, *, output_dir_given: bool) -> None:
    """Refuse a rendezvous that cannot work, naming the flag (ConfigError, exit code 2)."""
    static = {"--node-rank": nodes.rank, "--master-addr": nodes.master_addr,
              "--master-port": nodes.master_port}
    if nodes.rdzv_endpoint is not None:
        given = [flag for flag, value in static.items() if value is not None]
        if given:
            raise ConfigError(f"--rdzv-endpoint and {', '.join(given)} both say how the nodes "
                              "meet: give --rdzv-endpoint HOST:PORT alone (ranks are handed out "
                              "as nodes join), or --node-rank with --master-addr/--master-port.")
    elif nodes.rdzv_id is not None:
        raise ConfigError("--rdzv-id names a c10d rendezvous: add --rdzv-endpoint HOST:PORT "
                          "(the same on every node).")
    if nodes.rank is not None and nodes.rank >= nodes.count:
        raise ConfigError(f"--node-rank {nodes.rank} is out of range for --nnodes "
                          f"{nodes.count}: number the nodes 0 to {nodes.count - 1}.")
    if nodes.count > 1 and nodes.rdzv_endpoint is None:
        missing = [flag for flag, value in (("--node-rank", nodes.rank),
                                            ("--master-addr", nodes.master_addr))
                   if value is None]
        if missing:
            raise ConfigError(
                f"--nnodes {nodes.count} needs {' and '.join(missing)} on every node: "
                f"--node-rank is this machine's number (0 to {nodes.count - 1}), "
                "--master-addr the address of node 0 (--master-port its free port, default "
                "29500). Or give every node the same --rdzv-endpoint HOST:PORT instead.")
    if nodes.count > 1 and not output_dir_given:
        raise ConfigError(
            f"--nnodes {nodes.count}: every node must write to the same run directory, and "
            "without output_dir each node would make up its own timestamped one. Set "
            "output_dir= to a folder all nodes share, e.g. output_dir=$SCRATCH/runs/my-run, "
            "the same on every node.")


def check_under_slurm(nodes: Nodes, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse to start torchrun from each of several srun tasks per node: every task would
    start its own --nproc processes. One launcher per node, or one rank per srun task."""
    if "SLURM_STEP_ID" not in environ:
        return
    tasks = _int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS"))
    if tasks is not None and tasks > nodes.count:
        raise ConfigError(
            f"srun started {tasks} tasks and each would start torchrun for --nnodes "
            f"{nodes.count}: start one task per node (srun --ntasks-per-node=1) with "
            "--nnodes set to the node count, or drop --nproc/--nnodes and let each srun task "
            "be one rank (srun --ntasks-per-node=GPUS finetune run ...).")


def torchrun_command(nproc: int, recipe: str, overrides: list[str], output_dir: Path,
                     nodes: Nodes | None = None, timeout_s: int | None = None) -> list[str]:
    """The torchrun command line that runs the recipe on `nproc` processes of this machine,
    alone (--standalone) or as one of `nodes`, whose rendezvous waits `timeout_s` at most.
    torchrun runs through finetune.train.rendezvous, which reports a failed rendezvous."""
    rendezvous = (["--standalone"] if nodes is None
                  else nodes.torchrun_flags(output_dir, timeout_s))
    return [sys.executable, "-m", TORCHRUN_MODULE, *rendezvous,
            f"--nproc_per_node={nproc}", "-m", RANK_ENTRY_POINT, "run", recipe, *overrides]


def launch_processes(nproc: int, recipe: str, overrides: list[str], output_dir: Path,
                     nodes: Nodes | None = None, timeout_s: int | None = None) -> int:
    """Run the recipe on `nproc` processes with torchrun; return the run's exit code.

    `nodes`: this machine is one of several (None: this machine alone); when they do not all
    meet within `timeout_s` (distributed.timeout_s), or node 0's port is taken, this raises
    RendezvousError or ConfigError (exit code 2) naming the address. torchrun runs in its
    own process group, so a terminal's Ctrl-C reaches only this process, which forwards one
    SIGTERM: each rank then finishes its step and the ranks save one checkpoint together. When
    a rank fails, torchrun stops the others (SIGTERM, then SIGKILL after its shutdown timeout,
    30 s by default) and prints a summary with the failed rank's error. torchrun reports a
    rank's exit 75 as a plain failure, so the preemption marker the run leaves in output_dir
    restores the documented exit code.
    """
    command = torchrun_command(nproc, recipe, overrides, output_dir, nodes, timeout_s)
    logger.info("starting %d process(es) on this machine: %s", nproc, " ".join(command[1:]))
    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as scratch:
        report = Path(scratch) / "rendezvous.json"
        code = _wait_for(subprocess.Popen(command, start_new_session=True,
                                          env=launcher_env(report)))
        failure = read_report(report)
    if failure is not None:
        raise rendezvous_error(failure, nodes or Nodes(), timeout_s)
    if code != 0 and (output_dir / PREEMPTED_MARKER).is_file():
        return PREEMPTED_EXIT_CODE
    return code


def _wait_for(proc: subprocess.Popen) -> int:
    """Wait for torchrun, passing a signal this process gets on to it as one SIGTERM."""

    def forward(_signum: int, _frame: object) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[007-009,012],cpu1' -> 'gpu007'.

    Commas inside brackets separate ranges, outside them hosts; each bracket group contributes
    the start of its first range, zero padding kept ('rack[1-2]-n[01-04]' -> 'rack1-n01').
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)
    if not host or any(c in host for c in "[],"):
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM node list; set "
                          "MASTER_ADDR to the first node's address.")
    return host


def slurm_rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of a task that `srun` started directly, without torchrun.

    Empty unless this process is a task of an srun step (SLURM_STEP_ID is set: the batch script
    itself also sees SLURM_NTASKS but is one process) of more than one task, and RANK is unset.
    RANK, WORLD_SIZE and LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID;
    MASTER_ADDR is the step's first node; MASTER_PORT is derived from SLURM_JOB_ID, so every
    task picks the same one. A MASTER_ADDR or MASTER_PORT already set is kept.
    """
    tasks = _int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS"))
    if "RANK" in environ or "SLURM_STEP_ID" not in environ or not tasks or tasks < 2:
        return {}
    needed = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID")
    missing = [name for name in needed if _int(environ.get(name)) is None]
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        missing.append("SLURM_JOB_NODELIST")
    if missing:
        raise ConfigError(f"srun started {tasks} tasks but {', '.join(missing)} is not set; "
                          "start the run under torchrun instead (finetune run RECIPE --nproc N "
                          "from one srun task per node).")
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
           "LOCAL_RANK": environ["SLURM_LOCALID"],
           "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
           "MASTER_PORT": environ.get("MASTER_PORT")
           or str(15000 + int(environ["SLURM_JOB_ID"]) % 20000)}
    per_node = re.match(r"\d+", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if per_node:  # '8(x2)' or '8,4': this mapping assumes the first node's count
        env["LOCAL_WORLD_SIZE"] = per_node.group()
    return env


def adopt_slurm_rank(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set this process's torch.distributed variables from SLURM's and return them (see
    `slurm_rank_env`); empty unless srun started this process as one rank of several."""
    env = slurm_rank_env(environ)
    environ.update(env)
    return env


def adopt_submitit_rank() -> bool:
    """Under submitit with several tasks, make each task a torch.distributed rank (submitit's
    TorchDistributedEnvironment; CUDA_VISIBLE_DEVICES is left alone, so LOCAL_RANK picks the
    device). True when it did; False for a single task, outside submitit or when RANK is set."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks < 2:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                          overwrite=True)
    return True


class SchedulerPreemption:
    """Under submitit: its preemption signal asks the run for a checkpoint, and the requeue
    waits until the checkpoint is saved.

    submitit's handler for its signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)
    requeues the job and exits at once, mid-step. While this object is entered, that signal is
    passed on as SIGUSR1 to the run's PreemptionHandler when the training loop is running (the
    run then saves a checkpoint and returns PREEMPTED_EXIT_CODE), and goes straight to
    submitit's handler otherwise (the requeued job resumes from the last checkpoint).
    `requeue_if_preempted(code)`, called after the run returned, then calls submitit's handler,
    which requeues the job and exits (global rank 0; the other ranks return).

    `signum` and `scheduler_handler` are submitit's signal and handler; the defaults read them
    from the process when entered.
    """

    def __init__(self, signum: int | None = None,
                 scheduler_handler: Callable[[int, object], object] | None = None) -> None:
        self.signum = signum
        self.scheduler_handler = scheduler_handler
        self.passed_on = False
        self._previous: object = None

    def __enter__(self) -> SchedulerPreemption:
        if self.signum is None:
            from submitit import JobEnvironment

            self.signum = JobEnvironment._usr_sig()
        self._previous = signal.signal(self.signum, self._handle)
        if self.scheduler_handler is None and callable(self._previous):
            self.scheduler_handler = self._previous
        return self

    def _handle(self, signum: int, frame: object) -> None:
        loop = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)
        if isinstance(loop, PreemptionHandler):
            self.passed_on = True
            signal.raise_signal(signal.SIGUSR1)
        elif self.scheduler_handler is not None:
            self.scheduler_handler(signum, frame)

    def __exit__(self, *exc: object) -> None:
        signal.signal(self.signum, self._previous)

    def requeue_if_preempted(self, code: int) -> str | None:
        """After the run: when it stopped for this signal, let submitit requeue the job (on
        global rank 0 it exits). Returns why submitit did not requeue it, or None."""
        if code != PREEMPTED_EXIT_CODE or not self.passed_on or self.scheduler_handler is None:
            return None
        from submitit.core.utils import UncompletedJobError

        logger.info("checkpoint saved; handing the job to submitit to requeue it")
        try:
            self.scheduler_handler(self.signum, None)
        except UncompletedJobError as exc:  # e.g. out of time more than max_num_timeout times
            return str(exc)
        return None


__all__ = ["Nodes", "SchedulerPreemption", "adopt_slurm_rank", "adopt_submitit_rank",
           "check_nodes", "check_under_slurm", "first_slurm_host", "launch_processes",
           "slurm_rank_env", "torchrun_command"]
