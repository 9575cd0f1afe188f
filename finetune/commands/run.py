"""`finetune run RECIPE [OVERRIDES...] [--nproc N] [--nnodes M ...] [-m]`: train a recipe.

A run composes its config once and calls the recipe in this process. `--nproc N`, and across
machines `--nnodes M` with `--node-rank K --master-addr A [--master-port P]` or
`--rdzv-endpoint HOST:PORT`, relaunches the command under torchrun (finetune.train.launch),
with one output_dir fixed for every rank. A process that srun started as one task of several
takes its rank from SLURM's variables. `-m` runs Hydra's multirun: one job per combination of
the comma lists, each in OUTPUT_DIR/jobN, one after another in this process, or as submitit
jobs with hydra/launcher=slurm (or submitit_local); each job hands its exit code back.

Run as a module (`python -m finetune.commands.run run RECIPE ...`), this is each rank's entry
point under torchrun: the `finetune` command, with the exception that ends a rank recorded for
torchrun's failure summary (torch.distributed.elastic's `record`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ConfigError, FinetuneError
from finetune.train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from finetune.config.schema import RunConfig
    from finetune.train.launch import Nodes

logger = logging.getLogger(__name__)

# Hydra creates no run or sweep directory of its own and leaves logging alone; a job's label
# (override_dirname) leaves out the output_dir every job shares.
HYDRA_QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
               "hydra/hydra_logging=none", "hydra.sweep.subdir=.",
               "hydra.job.config.override_dirname.exclude_keys=[output_dir]"]


def _process_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of processes, 1 or more "
                                         "(e.g. --nproc 2)")
    return int(text)


def _node_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of machines, 1 or more "
                                         "(e.g. --nnodes 2)")
    return int(text)


def _node_rank(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text}: give this machine's number, 0 for the first "
                                         "(e.g. --node-rank 1)")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: give a TCP port, 1 to 65535 (e.g. 29500)")
    return int(text)


def _host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a host name or IP address that every "
                                         "node can reach (e.g. node001 or 10.0.0.1)")
    return text


def _name(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: give a name without spaces, the same on "
                                         "every node (e.g. --rdzv-id $SLURM_JOB_ID)")
    return text


def _endpoint(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or any(c.isspace() for c in host) or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: give HOST:PORT, a machine every node can "
                                         "reach and a free port on it (e.g. node001:29500)")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `run`'s arguments; overrides may come before or after the options."""
    parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                        help="a shipped recipe (see `finetune ls`) or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="OVERRIDES",
                        help="Hydra syntax: trainer.max_steps=50 peft=dora +new.key=1 ~key; "
                             "with -m, comma lists sweep (optim.lr=1e-4,2e-4)")
    parser.add_argument("--nproc", type=_process_count, default=1, metavar="N",
                        help="processes on this machine, started with torchrun (default 1)")
    nodes = parser.add_argument_group(
        "several machines", "run the same command on every machine, with the same output_dir "
        "on a shared file system; see docs/distributed.md")
    nodes.add_argument("--nnodes", type=_node_count, default=1, metavar="M",
                       help="machines in the run (default 1)")
    nodes.add_argument("--node-rank", type=_node_rank, metavar="K",
                       help="this machine's number, 0 to M-1 (static rendezvous)")
    nodes.add_argument("--master-addr", type=_host, metavar="A",
                       help="address of machine 0 (static rendezvous)")
    nodes.add_argument("--master-port", type=_port, metavar="P",
                       help="a free port on machine 0 (default 29500)")
    nodes.add_argument("--rdzv-endpoint", type=_endpoint, metavar="HOST:PORT",
                       help="c10d rendezvous instead: one machine's address and a free port, "
                            "the same on every machine; no --node-rank needed")
    nodes.add_argument("--rdzv-id", type=_name, metavar="ID",
                       help="the c10d rendezvous's name (default: derived from output_dir)")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="sweep the comma lists; job N writes to OUTPUT_DIR/jobN")


def _nodes(args: argparse.Namespace) -> Nodes | None:
    """The multi-node rendezvous the flags describe, or None for this machine alone."""
    from finetune.train.launch import Nodes

    nodes = Nodes(count=args.nnodes, rank=args.node_rank, master_addr=args.master_addr,
                  master_port=args.master_port, rdzv_endpoint=args.rdzv_endpoint,
                  rdzv_id=args.rdzv_id)
    return None if nodes == Nodes() else nodes


def run(args: argparse.Namespace) -> int:
    """Train once, on `args.nproc` processes (of `args.nnodes` machines), or sweep; the exit
    code (75: preempted)."""
    from finetune.config.compose import compose_run_config
    from finetune.distributed.deepspeed_config import check_settings as check_deepspeed
    from finetune.train.launch import Nodes, check_nodes, check_under_slurm, slurm_rank_env

    if args.recipe is None:
        raise ConfigError("finetune run needs a recipe, e.g. `finetune run lora_sft`. "
                          "`finetune ls` lists them.")
    nodes = _nodes(args)
    asked = args.nproc > 1 or nodes is not None
    launch = asked and "LOCAL_RANK" not in os.environ  # not yet under a launcher
    if args.multirun:
        if asked:
            raise ConfigError(
                "-m sweeps run one job after another (or, with hydra/launcher=slurm, as SLURM "
                "jobs sized by hydra.launcher.nodes and hydra.launcher.tasks_per_node); "
                "--nproc/--nnodes do not apply to them: drop them, or launch each job "
                "separately.")
        if slurm_rank_env(os.environ):
            raise ConfigError("-m sweeps start their jobs from one process, and srun started "
                              "several: start the sweep once (srun --ntasks=1), or let SLURM run "
                              "the jobs with hydra/launcher=slurm.")
        return sweep(args.recipe, args.overrides)
    if not launch:
        _take_rank_from_srun()
    cfg = compose_run_config(args.recipe, args.overrides)  # every key and type checked
    check_deepspeed(cfg.distributed)  # here, so a refusal exits 2 before any launch
    if str(cfg.distributed.strategy).startswith("deepspeed") and "LOCAL_RANK" not in os.environ:
        launch = True  # DeepSpeed needs a launcher's process group, even for one process
    if launch:
        check_nodes(nodes or Nodes(), output_dir_given=cfg.output_dir is not None)
        check_under_slurm(nodes or Nodes())
    overrides = list(args.overrides)
    if _resume_requeued(cfg):
        overrides.append("resume=auto")
    if cfg.output_dir is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "this process is one rank of several, started by torchrun, accelerate launch "
                "or srun, and without output_dir each rank would make up its own timestamped "
                "run directory. Set output_dir= to one folder every rank can reach, e.g. "
                "output_dir=runs/my-run (`finetune run --nproc N` picks one for all ranks).")
        from finetune.train.run_dir import default_output_dir

        cfg.output_dir = str(default_output_dir(cfg.recipe))
        overrides.append(f"output_dir={cfg.output_dir}")  # one directory for all ranks
    if launch:
        from finetune.train.launch import launch_processes

        output_dir = Path(cfg.output_dir)
        with _run_dir_lock_for_ranks(output_dir, nodes):
            if nodes is None:  # this machine alone: torchrun --standalone
                return launch_processes(args.nproc, args.recipe, overrides, output_dir)
            return launch_processes(args.nproc, args.recipe, overrides, output_dir,
                                    nodes=nodes, timeout_s=cfg.distributed.timeout_s)
    from finetune.train.run import run_recipe

    return run_recipe(cfg)


@contextmanager
def _run_dir_lock_for_ranks(output_dir: Path, nodes: Nodes | None) -> Iterator[None]:
    """The launcher on the machine of global rank 0 (this machine alone, or node 0 of a static
    rendezvous) holds the run directory's lock for as long as its ranks run, so a second run
    is refused before it starts any process; its ranks are told who holds it. With a c10d
    rendezvous nobody knows in advance where rank 0 runs, and rank 0 itself takes the lock."""
    from finetune.train.run_dir import LOCK_OWNER_ENV, RunDirLock

    if nodes is not None and (nodes.rdzv_endpoint is not None or (nodes.rank or 0) != 0):
        yield
        return
    with RunDirLock(output_dir):
        os.environ[LOCK_OWNER_ENV] = str(os.getpid())
        try:
            yield
        finally:
            os.environ.pop(LOCK_OWNER_ENV, None)


def _take_rank_from_srun() -> None:
    """A task that srun started as one of several becomes that rank of the run; the console
    is set up again, as for torchrun's ranks, now that the rank is known."""
    from finetune.train.launch import adopt_slurm_rank

    env = adopt_slurm_rank()
    if env:
        from finetune.metrics.console_log import setup_logging

        setup_logging()
        logger.info("srun task: rank %s of %s, master %s:%s", env["RANK"], env["WORLD_SIZE"],
                    env["MASTER_ADDR"], env["MASTER_PORT"])


def _resume_requeued(cfg: RunConfig, *, submitit_job: bool = False) -> bool:
    """A job that was requeued (preempted or out of time) continues its own run: resume=auto
    unless resume was given. True when it set it.

    Requeued: SLURM says so (SLURM_RESTART_COUNT 1 or more), or, for a submitit job, its run
    directory holds the marker of a preempted run (submitit's local executor restarts a job
    without telling it).
    """
    from finetune.train.signals import PREEMPTED_MARKER

    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    slurm = restarts.isdigit() and int(restarts) >= 1
    marked = submitit_job and cfg.output_dir is not None and \
        (Path(cfg.output_dir) / PREEMPTED_MARKER).is_file()
    if cfg.resume is not None or not (slurm or marked):
        return False
    cfg.resume = "auto"
    logger.info("this job was requeued%s: resume=auto continues its run",
                f" (SLURM restart {restarts})" if slurm else " after a preemption")
    return True


@dataclass(frozen=True)
class SweepJob:
    """What one sweep job hands back to Hydra's launcher (as its JobReturn's return value).
    `state`: how it ended when not simply by its exit code ("not started", "already done")."""

    num: int
    overrides: str
    exit_code: int
    error: str | None = None
    state: str | None = None


class _SweepStop:
    """The job of an in-process sweep during which a stop signal came (Ctrl-C, SIGTERM,
    SIGUSR1: the job saved a checkpoint, or had just finished): the jobs after it do not
    start, so a signal stops the sweep."""

    stopped_in: int | None = None


def _finished_run(run_dir: Path) -> bool:
    """A run that wrote its final model and summary (summary.json is written last)."""
    return (run_dir / "summary.json").is_file() and (run_dir / "final").is_dir()


def run_sweep_job(dict_cfg: DictConfig) -> SweepJob:
    """Hydra's task function: run one job of a sweep; its exit code and error are returned,
    not raised, so the other jobs still run and the end of the sweep lists the failures.

    It runs in this process (Hydra's basic launcher) or in a submitit job, a fresh process on
    this machine or a SLURM node: there it sets up the console, makes each of the job's tasks
    one rank of the run, and lets submitit's preemption signal save a checkpoint before
    submitit requeues the job.
    """
    from hydra.core.hydra_config import HydraConfig

    from finetune.config.compose import to_run_config
    from finetune.train.run import run_recipe
    from finetune.train.run_dir import default_output_dir

    job = HydraConfig.get().job
    under_submitit = "SUBMITIT_EXECUTOR" in os.environ
    if under_submitit:
        _become_submitit_task()
    try:
        cfg = to_run_config(dict_cfg)
        base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
        cfg.output_dir = str(base / f"job{job.num}")
        if _SweepStop.stopped_in is not None:
            return SweepJob(job.num, job.override_dirname, PREEMPTED_EXIT_CODE,
                            state="not started")
        _resume_requeued(cfg, submitit_job=under_submitit)
        if cfg.resume == "auto" and _finished_run(Path(cfg.output_dir)):
            print(f"[sweep job {job.num}] {job.override_dirname}: finished before, in "
                  f"{cfg.output_dir}; kept as it is", flush=True)
            return SweepJob(job.num, job.override_dirname, 0, state="already done")
        print(f"[sweep job {job.num}] {job.override_dirname} -> {cfg.output_dir}", flush=True)
        if not under_submitit:
            PreemptionHandler.last_signal = None
            code = run_recipe(cfg)
            if code == PREEMPTED_EXIT_CODE or PreemptionHandler.last_signal is not None:
                _SweepStop.stopped_in = job.num
            return SweepJob(job.num, job.override_dirname, code)
        from finetune.train.launch import SchedulerPreemption

        with SchedulerPreemption() as preemption:
            code = run_recipe(cfg)
            refused = preemption.requeue_if_preempted(code)
        note = refused and (f"the checkpoint is saved but submitit did not requeue the job "
                            f"({refused}); continue it with resume=auto")
        return SweepJob(job.num, job.override_dirname, code, note or None)
    except FinetuneError as exc:
        return SweepJob(job.num, job.override_dirname, exc.exit_code, str(exc))
    except Exception:  # a bug: its traceback goes to the end of the sweep
        return SweepJob(job.num, job.override_dirname, 1, traceback.format_exc().rstrip())


def _become_submitit_task() -> None:
    from finetune.metrics.console_log import setup_logging
    from finetune.train.launch import adopt_submitit_rank

    ranked = adopt_submitit_rank()
    setup_logging()  # a fresh process, which the command line never set up
    if ranked:
        logger.info("submitit task: rank %s of %s, master %s:%s", os.environ["RANK"],
                    os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"],
                    os.environ["MASTER_PORT"])


def sweep(recipe: str, overrides: list[str]) -> int:
    """Run a Hydra multirun through its launcher (hydra.launcher) and return the highest exit
    code of its jobs.

    The default launcher runs the jobs one after another in this process; hydra/launcher=slurm
    and submitit_local submit them through submitit and wait for them. Each job returns its
    exit code and error (SweepJob); a failed job does not stop the others, and the errors are
    printed at the end. Hydra writes its record of the sweep, multirun.yaml, into OUTPUT_DIR
    (submitit its job files and the jobs' console output into OUTPUT_DIR/.submitit).
    """
    from finetune.config.compose import resolve_recipe, shipped_config_dir
    from finetune.config.schema import register_schemas
    from finetune.train.run_dir import RunDirLock, default_output_dir

    config_dir, config_name = resolve_recipe(recipe)
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides = [*overrides, f"output_dir={default_output_dir(Path(recipe).stem)}"]
    sweep_dir = next(o.split("=", 1)[1] for o in reversed(overrides)
                     if o.startswith("output_dir="))
    hydra_args = [*HYDRA_QUIET, f"hydra.sweep.dir={sweep_dir}"]
    if config_dir != shipped_config_dir():  # hydra/launcher=slurm and the groups still resolve
        hydra_args.append(f"hydra.searchpath=[file://{shipped_config_dir()}]")
    register_schemas()
    if any(o.startswith("hydra/launcher=") and o != "hydra/launcher=basic" for o in overrides):
        print(f"sweep: submitting the jobs; they write to {sweep_dir}/jobN and print to "
              f"{sweep_dir}/.submitit/JOB_ID/; this command waits for them", flush=True)
    _SweepStop.stopped_in = None
    with RunDirLock(Path(sweep_dir)):  # two sweeps into one folder would mix their jobs
        returns = _multirun(config_dir, config_name, overrides, hydra_args, sweep_dir)
    results = [_sweep_job_result(job) for job in _job_returns(returns)]
    for result in results:
        state = result.state or {0: "done", PREEMPTED_EXIT_CODE: "preempted (75)"}.get(
            result.exit_code, f"failed ({result.exit_code})")
        print(f"[sweep job {result.num}] {result.overrides}: {state}")
    for result in results:
        if result.error:
            print(f"error: job {result.num} ({result.overrides}): {result.error}",
                  file=sys.stderr)
    if _SweepStop.stopped_in is not None:
        print(f"sweep stopped by a signal during job {_SweepStop.stopped_in}: the same "
              "command with resume=auto keeps the finished jobs, continues a stopped one from "
              "its checkpoint and runs the jobs that did not start", file=sys.stderr)
    return max((result.exit_code for result in results), default=0)


def _multirun(config_dir: Path, config_name: str, overrides: list[str], hydra_args: list[str],
              sweep_dir: str) -> object:
    """Hydra's multirun of run_sweep_job over the user's `overrides`; its errors as the
    user's."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from finetune.config.compose import explain_config_error

    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings(), initialize_config_dir(
                config_dir=str(config_dir), version_base=None, job_name=f"finetune-{config_name}"):
            # Our hydra/launcher/submitit_local.yaml has the plugin's name; Hydra checks it
            # against the plugin's schema and warns that it will stop checking. The file sets
            # every key itself, so it works either way.
            warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is "
                                                      "validated against ConfigStore schema")
            return GlobalHydra.instance().hydra.multirun(
                config_name=config_name, task_function=run_sweep_job,
                overrides=[*overrides, *hydra_args], with_log_configuration=False)
    except Exception as exc:
        if "submitit" in str(exc) and not _has_submitit_launcher():
            raise ConfigError("hydra/launcher=slurm and submitit_local need the submitit "
                              "launcher, which is not installed: pip install "
                              "'finetune[slurm]' (hydra-submitit-launcher).") from None
        if isinstance(exc, HydraException | OmegaConfBaseException):
            raise explain_config_error(exc, overrides) from None
        if not _lost_job(exc):
            raise
        what = " ".join(str(exc).splitlines()[:2])  # submitit's job id and state; its log follows
        raise FinetuneError(f"a sweep job ended without handing back a result (killed, out of "
                            f"memory, its node lost?): {what}. Its console output is in "
                            f"{sweep_dir}/.submitit/; jobs that finished kept their run "
                            f"directories in {sweep_dir}.") from None
    finally:
        GlobalHydra.instance().clear()


def _has_submitit_launcher() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def _lost_job(exc: BaseException) -> bool:
    """submitit's error for a job whose process ended without a result (killed, node lost)."""
    try:
        from submitit.core.utils import UncompletedJobError
    except ImportError:
        return False
    return isinstance(exc, UncompletedJobError)


def _job_returns(value: object) -> list:
    """The JobReturns in what a sweeper returns (the basic sweeper: a list per batch)."""
    from hydra.core.utils import JobReturn

    if isinstance(value, JobReturn):
        return [value]
    if isinstance(value, list | tuple):
        return [job for item in value for job in _job_returns(item)]
    return []


def _sweep_job_result(job_return) -> SweepJob:
    """The job's SweepJob; a job that raised outside run_sweep_job becomes a failed one."""
    try:
        return job_return.return_value
    except Exception as exc:
        num = job_return.hydra_cfg.hydra.job.num if job_return.hydra_cfg else -1
        return SweepJob(num, " ".join(job_return.overrides or []), 1,
                        f"{type(exc).__name__}: {exc}")


# What torch.distributed says on a rank whose peer process is gone (gloo, NCCL, the TCP store).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited", "communicator was aborted")


def rank_main() -> int:
    """One rank of `finetune run --nproc`: the `finetune` command, except that a rank stopped
    because another rank ended first (a collective whose peer is gone) says so in one line and
    exits 1 instead of printing a traceback (a run past its first step keeps it in
    logs/rank_N.log); the rank that ended first has said why."""
    from finetune.cli import main

    try:
        return main()
    except Exception as exc:
        if not any(marker in str(exc) for marker in PEER_GONE):
            raise
        print(f"error: rank {os.environ.get('RANK', '?')} stopped because another rank of "
              "the run ended first (that rank's message is above)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # each rank's entry point under torchrun (finetune.train.launch)
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(rank_main)())
