"""Launching: the multi-node flags and their errors, the torchrun command, ranks taken from
srun's variables, the rank log files, submitit's preemption signal, sweeps that hand back
exit codes, and the shipped hydra/launcher configs."""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import finetune.commands.ls
import finetune.train.launch as launch
from finetune.cli import main
from finetune.config.compose import shipped_config_dir
from finetune.errors import ConfigError
from finetune.train.launch import (
    Nodes,
    SchedulerPreemption,
    first_slurm_host,
    slurm_rank_env,
    torchrun_command,
)
from finetune.train.rank_log import attach_rank_log, detach_rank_log, rank_log, rank_log_path
from finetune.train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "SLURM_", "SUBMITIT_", "TORCHELASTIC_")


class Result(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Start without any launcher's variables; main() and the srun mapping change the
    `finetune` logger and os.environ: undo both."""
    log = logging.getLogger("finetune")
    saved_log = (log.handlers[:], log.level, log.propagate)
    saved_env = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(LAUNCHER_VARIABLES)]:
        del os.environ[name]
    yield
    log.handlers[:], log.level, log.propagate = saved_log
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record launch_processes' arguments instead of starting torchrun."""
    calls: list = []
    monkeypatch.setattr(launch, "launch_processes",
                        lambda *a, **kw: calls.append((a, kw)) or 0)
    return calls


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace finetune.train.run with a recipe runner that records each config it gets."""
    seen: list = []
    module = types.ModuleType("finetune.train.run")
    module.run_recipe = lambda cfg: seen.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "finetune.train.run", module)
    return seen


# --- the flags ------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "expected"), [
    (["--nnodes", "0"], "argument --nnodes: 0: give a whole number of machines"),
    (["--nnodes", "two"], "argument --nnodes: two: give a whole number of machines"),
    (["--node-rank", "-1"], "argument --node-rank: -1: give this machine's number"),
    (["--master-port", "70000"], "argument --master-port: 70000: give a TCP port"),
    (["--master-port", "http"], "argument --master-port: http: give a TCP port"),
    (["--master-addr", "node 1"], "argument --master-addr: 'node 1': give a host name"),
    (["--rdzv-endpoint", "node001"], "argument --rdzv-endpoint: node001: give HOST:PORT"),
    (["--rdzv-endpoint", "node001:0"], "argument --rdzv-endpoint: node001:0: give HOST:PORT"),
    (["--nnodes", "2", "--master-addr", "n0"], "--nnodes 2 needs --node-rank on every node"),
    (["--nnodes", "2", "--node-rank", "0"], "--nnodes 2 needs --master-addr on every node"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "n0"],
     "--node-rank 2 is out of range for --nnodes 2: number the nodes 0 to 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "n0:29500", "--node-rank", "1"],
     "--rdzv-endpoint and --node-rank both say how the nodes meet"),
    (["--nproc", "2", "--rdzv-id", "job7"], "--rdzv-id names a c10d rendezvous"),
    (["--rdzv-id", "job 7"], "argument --rdzv-id: 'job 7': give a name without spaces"),
    (["-m", "--nnodes", "2"], "-m sweeps run one job after another"),
])
def test_bad_flags_exit_2_naming_the_flag(cli: Callable[..., Result], launches: list,
                                          tmp_path: Path, flags: list[str],
                                          expected: str) -> None:
    result = cli("run", "lora_sft", *flags, f"output_dir={tmp_path / 'run'}")
    assert result.code == 2, result.err
    last = result.err.splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.err
    assert launches == []
    assert not (tmp_path / "run").exists()


def test_several_nodes_need_one_shared_output_dir(cli: Callable[..., Result],
                                                  launches: list) -> None:
    result = cli("run", "lora_sft", "--nnodes", "2", "--node-rank", "1", "--master-addr", "n0")
    assert result.code == 2
    assert "Set output_dir= to a folder all nodes share" in result.err
    assert launches == []


def test_a_rank_without_output_dir_is_refused(cli: Callable[..., Result], runs: list) -> None:
    os.environ.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")  # as torchrun sets them
    result = cli("run", "lora_sft")
    assert result.code == 2
    assert "each rank would make up its own timestamped run directory" in result.err
    assert runs == []


def test_multi_node_flags_reach_torchrun(cli: Callable[..., Result], launches: list,
                                         runs: list, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    result = cli("run", "lora_sft", "peft.r=4", "--nproc", "2", "--nnodes", "2",
                 "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29511",
                 f"output_dir={out}")
    assert result.code == 0, result.err
    assert runs == []
    ((args, kwargs),) = launches
    nproc, recipe, overrides, output_dir = args
    assert (nproc, recipe, overrides, output_dir) == (2, "lora_sft",
                                                      ["peft.r=4", f"output_dir={out}"], out)
    nodes = kwargs["nodes"]
    assert nodes == Nodes(count=2, rank=1, master_addr="10.0.0.1", master_port=29511)
    command = torchrun_command(nproc, recipe, overrides, output_dir, nodes)
    assert "--standalone" not in command
    start = command.index(launch.TORCHRUN_MODULE) + 1
    assert command[start:command.index("-m", start)] == [
        "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29511",
        "--nproc_per_node=2"]
    assert command[-4:] == ["run", "lora_sft", "peft.r=4", f"output_dir={out}"]


def test_an_output_dir_from_the_recipe_file_is_the_shared_one(
        cli: Callable[..., Result], launches: list, tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((shipped_config_dir() / "lora_sft.yaml").read_text()
                      + f"output_dir: {tmp_path / 'shared'}\n")
    result = cli("run", str(recipe), "--nnodes", "2", "--rdzv-endpoint", "n0:29400")
    assert result.code == 0, result.err
    ((args, kwargs),) = launches
    assert args[3] == tmp_path / "shared" and kwargs["nodes"].count == 2


def test_c10d_rendezvous_gets_one_id_per_output_dir() -> None:
    nodes = Nodes(count=4, rdzv_endpoint="node001:29400")
    flags = nodes.torchrun_flags(Path("runs/a"))
    assert flags[:3] == ["--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29400"]
    assert flags == nodes.torchrun_flags(Path("runs/a"))  # every node computes the same id
    assert flags[3] != nodes.torchrun_flags(Path("runs/b"))[3]
    named = Nodes(count=4, rdzv_endpoint="node001:29400", rdzv_id="job7")
    assert named.torchrun_flags(Path("runs/a"))[3] == "--rdzv_id=job7"


def test_one_machine_is_standalone_and_ranks_run_the_recorded_entry_point(
        cli: Callable[..., Result], launches: list, tmp_path: Path) -> None:
    assert cli("run", "lora_sft", "--nproc", "2", f"output_dir={tmp_path}").code == 0
    ((args, kwargs),) = launches
    assert kwargs == {}  # no --nnodes: this machine alone
    command = torchrun_command(*args)
    assert "--standalone" in command
    assert command[command.index("--nproc_per_node=2") + 1:][:2] == ["-m",
                                                                      launch.RANK_ENTRY_POINT]


@pytest.mark.filterwarnings("ignore:'finetune.commands.run' found in sys.modules")
def test_the_rank_entry_point_records_the_exception_for_torchrun(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def fail(_args: object) -> int:
        raise RuntimeError("rank 3 lost its GPU")

    monkeypatch.setattr(finetune.commands.ls, "run", fail)
    monkeypatch.setattr(sys, "argv", ["run.py", "ls"])
    with pytest.raises(RuntimeError):
        runpy.run_module(launch.RANK_ENTRY_POINT, run_name="__main__")
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == "RuntimeError: rank 3 lost its GPU"
    assert "rank 3 lost its GPU" in message["extraInfo"]["py_callstack"]


def test_one_torchrun_per_node_under_srun(cli: Callable[..., Result], launches: list,
                                          tmp_path: Path) -> None:
    os.environ.update(SLURM_STEP_ID="0", SLURM_NTASKS="16", SLURM_JOB_ID="42")
    result = cli("run", "lora_sft", "--nproc", "8", "--nnodes", "2", "--node-rank", "0",
                 "--master-addr", "n0", f"output_dir={tmp_path}")
    assert result.code == 2
    assert "srun started 16 tasks" in result.err and "--ntasks-per-node=1" in result.err
    assert launches == []


# --- ranks from srun ------------------------------------------------------------------------

SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
             "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_STEP_NODELIST": "gpu[007-008]"}


def test_an_srun_task_becomes_its_rank() -> None:
    assert slurm_rank_env(SRUN_TASK) == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(15000 + 123456 % 20000)}
    other = slurm_rank_env({**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert other["MASTER_PORT"] == slurm_rank_env(SRUN_TASK)["MASTER_PORT"]
    chosen = slurm_rank_env({**SRUN_TASK, "MASTER_ADDR": "10.1.1.7", "MASTER_PORT": "29555"})
    assert (chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == ("10.1.1.7", "29555")


@pytest.mark.parametrize("env", [
    {**SRUN_TASK, "RANK": "2"},  # torchrun (or accelerate) already gave the rank
    {**SRUN_TASK, "SLURM_NTASKS": "1"},  # one task: a plain single-process run
    {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"},  # the batch script itself
    {},
], ids=["rank-set", "one-task", "batch-script", "no-slurm"])
def test_other_processes_keep_their_environment(env: dict[str, str]) -> None:
    assert slurm_rank_env(env) == {}


def test_an_srun_task_without_its_procid_is_an_error() -> None:
    with pytest.raises(ConfigError, match="SLURM_PROCID is not set"):
        slurm_rank_env({k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"})


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node001", "node001"), ("gpu[007-009,012],cpu1", "gpu007"), ("a1,b[2-3]", "a1"),
    ("rack[1-2]-n[01-04]", "rack1-n01"), ("gpu-[3,5]-ib", "gpu-3-ib"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_run_under_srun_uses_the_slurm_rank(cli: Callable[..., Result], runs: list,
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.update(SRUN_TASK)
    result = cli("run", "lora_sft", f"output_dir={tmp_path / 'run'}")
    assert result.code == 0, result.err
    assert len(runs) == 1
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu007"}
    # rank 11's console shows warnings only, as torchrun's ranks other than 0 do
    logging.getLogger("finetune.train").info("step 3 done")
    logging.getLogger("finetune.train").warning("slow step")
    console = capsys.readouterr().err
    assert "slow step" in console and "step 3 done" not in console


def test_a_requeued_slurm_job_resumes_its_run(cli: Callable[..., Result], runs: list,
                                              launches: list, tmp_path: Path) -> None:
    os.environ["SLURM_RESTART_COUNT"] = "1"
    assert cli("run", "lora_sft", f"output_dir={tmp_path / 'a'}").code == 0
    assert cli("run", "lora_sft", f"output_dir={tmp_path / 'b'}", "resume=x/step_9").code == 0
    assert cli("run", "lora_sft", "--nproc", "2", f"output_dir={tmp_path / 'c'}").code == 0
    assert [cfg.resume for cfg in runs] == ["auto", "x/step_9"]
    ((args, _),) = launches
    assert args[2][-1] == "resume=auto"  # every rank gets it
    del os.environ["SLURM_RESTART_COUNT"]
    assert cli("run", "lora_sft", f"output_dir={tmp_path / 'd'}").code == 0
    assert runs[-1].resume is None


# --- per-rank log files ---------------------------------------------------------------------

def test_rank_log_gets_this_rank_s_records_and_the_error_that_ended_it(tmp_path: Path) -> None:
    log = logging.getLogger("finetune.train.some_module")
    package = logging.getLogger("finetune")
    package.propagate, package.level = False, logging.INFO  # as the command line sets it
    with pytest.raises(ValueError), rank_log(tmp_path, 3):
        log.info("step 1 done")
        log.debug("not at this level")
        logging.getLogger("torch.distributed").warning("NCCL is slow")
        raise ValueError("shape mismatch in layer 7")
    text = rank_log_path(tmp_path, 3).read_text()
    records, _, error = text.partition("Traceback")
    lines = records.splitlines()
    assert rank_log_path(tmp_path, 3) == tmp_path / "logs" / "rank_3.log"
    assert "rank 3 of" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert sum("step 1 done" in line for line in lines) == 1
    assert "not at this level" not in records and "NCCL is slow" in records
    assert "ValueError: shape mismatch in layer 7" in error
    # detached: later records go nowhere near the file
    log.info("after the run")
    assert "after the run" not in rank_log_path(tmp_path, 3).read_text()


def test_rank_log_appends_on_resume_and_writes_user_errors_as_one_line(tmp_path: Path) -> None:
    package = logging.getLogger("finetune")
    package.propagate, package.level = True, logging.INFO  # records reach the root's handler
    handler = attach_rank_log(tmp_path, 0)
    logging.getLogger("finetune.x").info("first run")
    detach_rank_log(handler)
    handler = attach_rank_log(tmp_path, 0)
    detach_rank_log(handler, ConfigError("data.path=x.jsonl: no such file"))
    text = rank_log_path(tmp_path, 0).read_text()
    assert text.count("rank 0 of") == 2 and text.count("first run") == 1
    assert text.splitlines()[-1].endswith("error: data.path=x.jsonl: no such file")
    assert "Traceback" not in text


# --- submitit's preemption signal -----------------------------------------------------------

def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_submitit_signal_during_training_saves_first_then_requeues() -> None:
    requeues: list[int] = []
    with SchedulerPreemption(signal.SIGUSR2, lambda signum, _f: requeues.append(signum)) as p:
        with PreemptionHandler() as loop:
            signal.raise_signal(signal.SIGUSR2)
            _wait_for(lambda: loop.requested is not None)
        assert loop.requested == signal.SIGUSR1  # the loop saves and returns 75
        assert requeues == []  # not yet: the checkpoint comes first
        p.requeue_if_preempted(PREEMPTED_EXIT_CODE)
    assert requeues == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_submitit_signal_outside_training_goes_to_submitit_at_once() -> None:
    requeues: list[int] = []
    with SchedulerPreemption(signal.SIGUSR2, lambda signum, _f: requeues.append(signum)) as p:
        signal.raise_signal(signal.SIGUSR2)
        _wait_for(lambda: bool(requeues))
        assert requeues == [signal.SIGUSR2]
        p.requeue_if_preempted(0)  # a run that finished is not requeued again
    assert requeues == [signal.SIGUSR2]


def test_a_refused_requeue_is_reported_not_raised() -> None:
    from submitit.core.utils import UncompletedJobError

    def out_of_requeues(_signum: int, _frame: object) -> None:
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    with SchedulerPreemption(signal.SIGUSR2, out_of_requeues) as p:
        with PreemptionHandler() as loop:
            signal.raise_signal(signal.SIGUSR2)
            _wait_for(lambda: loop.requested is not None)
        assert p.requeue_if_preempted(PREEMPTED_EXIT_CODE) == (
            "Job not requeued because: timed-out too many times.")


# --- sweeps ---------------------------------------------------------------------------------

def test_a_sweep_job_with_a_bug_is_reported_at_the_end(
        cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    ran: list[int] = []

    def run_recipe(cfg):
        ran.append(cfg.peft.r)
        if cfg.peft.r == 2:
            raise KeyError("a bug in job 0")
        return PREEMPTED_EXIT_CODE

    module = types.ModuleType("finetune.train.run")
    module.run_recipe = run_recipe
    monkeypatch.setitem(sys.modules, "finetune.train.run", module)
    result = cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'sweep'}")
    assert ran == [2, 4]
    assert result.code == PREEMPTED_EXIT_CODE  # the highest of 1 and 75
    assert "[sweep job 0] peft.r=2: failed (1)" in result.out
    assert "[sweep job 1] peft.r=4: preempted (75)" in result.out
    assert result.err.startswith("error: job 0 (peft.r=2): Traceback")
    assert "KeyError: 'a bug in job 0'" in result.err


# --- the shipped hydra/launcher configs -----------------------------------------------------

def _launcher(recipe: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from finetune.config.compose import resolve_recipe
    from finetune.config.schema import register_schemas

    register_schemas()
    config_dir, name = resolve_recipe(recipe)
    search = ([] if config_dir == shipped_config_dir()
              else [f"hydra.searchpath=[file://{shipped_config_dir()}]"])
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(name, overrides=[*overrides, *search], return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.filterwarnings(r"ignore:\s+'hydra/launcher/submitit_local' is validated")
def test_hydra_launcher_slurm_is_ours_with_a_rank_per_gpu(tmp_path: Path) -> None:
    launcher = _launcher("lora_sft", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                         "hydra.launcher.gpus_per_node=4")
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0  # a job out of time is requeued and resumes
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((shipped_config_dir() / "lora_sft.yaml").read_text())
    mine = _launcher(str(recipe), "hydra/launcher=slurm_example")
    assert (mine.partition, mine.nodes, mine.tasks_per_node) == ("gpu-h100", 2, 8)
    local = _launcher("lora_sft", "hydra/launcher=submitit_local")
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    assert local.gpus_per_node == 1  # submitit would hide every GPU with none
