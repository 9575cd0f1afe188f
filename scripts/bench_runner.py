"""Running the speed benchmark's sides: preparing the workdir, launching one side in a fresh
process, and reading back its figures (scripts/bench.py and its --gpu mode use it).

A workdir holds model/ (built here, or a link to the user's `--model` folder), data.jsonl (made
here, or the user's `--data` rows as chat rows), settings.json, plan.json
(bench_workload.plan_summary per mode), batches/<mode>/ (finetune's micro-batches) and
runs/<run>/ (each process's output.log, result.json and, for finetune, its run directory).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import bench_report as report
import bench_workload as workload

from finetune.train.signals import PREEMPTED_EXIT_CODE

SCRIPTS = Path(__file__).resolve().parent
T = TypeVar("T")


class SideInterrupted(RuntimeError):
    """A side's process was stopped by a signal from outside (killed, or finetune preempted
    by SIGTERM): nothing it measured is usable, and running it again is."""


def run_order(sides: Sequence[T], repeats: int) -> list[tuple[int, T]]:
    """A/B/A/B: every side once per repetition, the order rotated by one each repetition so no
    side always runs first (cold disk cache) or after the same neighbour."""
    order = []
    for rep in range(repeats):
        shift = rep % len(sides)
        order.extend((rep, side) for side in [*sides[shift:], *sides[:shift]])
    return order


def side_environment(base: Mapping[str, str], omp_wait_policy: str) -> dict[str, str]:
    """The environment every side runs in: `base` with the hub offline, W&B off and
    OMP_WAIT_POLICY set (`inherit`: left as it is). PASSIVE is bench.py's default: with
    OpenMP's default busy-wait, a side whose threads are descheduled on a shared machine burns
    its CPU spinning at every barrier, which measures the neighbours rather than the side
    (see docs/benchmarks.md)."""
    env = {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    return env


# ---------------------------------------------------------------- preparing


def prepare(settings: workload.Settings, workdir: Path, *, env: Mapping[str, str],
            timeout: float, model_dtype: str = "fp32", model_device: str = "cpu") -> dict:
    """Write the workdir (see the module docstring) in a fresh process and return its
    prepared.json: {"stats": {mode: per-step counts of finetune's batches
    (bench_workload.dump_batches)}, "lengths": token lengths of the rows}. The model's weights
    are written in `model_dtype`, initialised on `model_device`.

    In another process so that this one stays small: a process started from it begins with
    this one's peak RSS as its own ru_maxrss (exec keeps it), which would hide the sides'."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.json").write_text(json.dumps(settings.to_json()), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "prepare", str(workdir),
               model_dtype, model_device]
    log = workdir / "prepare.log"
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                              timeout=timeout, check=False)
    if done.returncode == 2:  # the user's model or data (a WorkloadError), said in one line
        last = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise workload.WorkloadError(last[0] if last else f"preparing failed (see {log})")
    if done.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"preparing the workdir failed (exit code {done.returncode}):\n{tail}")
    return json.loads((workdir / "prepared.json").read_text(encoding="utf-8"))


def _prepare_here(workdir: Path, model_dtype: str, model_device: str) -> None:
    """prepare()'s work, in the process it starts."""
    from transformers import AutoTokenizer

    from finetune.models.tiny import build_tiny_tokenizer

    settings = workload.Settings.from_json(
        json.loads((workdir / "settings.json").read_text(encoding="utf-8")))
    if settings.model:
        (workdir / "model").symlink_to(settings.model, target_is_directory=True)
    else:
        workload.build_model_folder(settings.size, workdir / "model", dtype=model_dtype,
                                    device=model_device)
    if settings.data:
        rows = workload.chat_rows(Path(settings.data))
    else:
        words = workload.vocabulary_words(build_tiny_tokenizer())
        rows = workload.make_rows(settings.rows, settings.max_seq_len, words)
    workload.write_jsonl(rows, workdir / "data.jsonl")
    plans, stats = {}, {}
    for mode in ("unpacked", "packed"):
        overrides = workload.ours_overrides(
            settings, model_dir=workdir / "model", data_path=workdir / "data.jsonl",
            packing=mode == "packed", cache_dir=workdir / "prepare-cache")
        plans[mode], stats[mode] = workload.dump_batches(overrides, settings.steps,
                                                         workdir / "batches" / mode)
    (workdir / "plan.json").write_text(json.dumps(plans), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    lengths = {**workload.length_summary(workload.row_lengths(tokenizer, rows)),
               "rows": len(rows), "parameters": workload.weight_count(workdir / "model")}
    (workdir / "prepared.json").write_text(json.dumps({"stats": stats, "lengths": lengths}),
                                           encoding="utf-8")


# ---------------------------------------------------------------- running one side


def side_command(side: tuple[str, str], settings: workload.Settings, workdir: Path,
                 run_dir: Path) -> list[str]:
    """The command line of one run of `side`; its results go to run_dir/result.json (and, for
    finetune, run_dir/metrics.jsonl)."""
    who, mode = side
    result = run_dir / "result.json"
    if who == "ours":
        overrides = workload.ours_overrides(
            settings, model_dir=workdir / "model", data_path=workdir / "data.jsonl",
            packing=mode == "packed", cache_dir=run_dir / "cache", output_dir=run_dir / "run")
        return [sys.executable, str(SCRIPTS / "bench_ours.py"), str(result), "run", "lora_sft",
                *overrides]
    script = {"reference": "bench_reference.py", "trl": "bench_trl.py"}[who]
    return [sys.executable, str(SCRIPTS / script), str(workdir), mode, str(result)]


def wait_with_usage(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for `proc`; return (exit code, its peak RSS in MiB from wait4). Kills it after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes / KiB
            return proc.returncode, usage.ru_maxrss * scale / 2**20
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise TimeoutError(f"{proc.args[1]} ran past {timeout:.0f} s")
        time.sleep(0.05)


def run_side(side: tuple[str, str], settings: workload.Settings, workdir: Path, rep: int,
             stats: dict[str, list[dict]], env: dict[str, str], timeout: float, *,
             extra_overrides: Sequence[str] = (), name: str | None = None) -> report.RunResult:
    """Launch one run of `side` in a fresh process and read back its figures.
    `extra_overrides` go to finetune's command line (--gpu's kernel variants); `name` names
    the run's folder (default: the side)."""
    who, mode = side
    run_dir = workdir / "runs" / f"{name or f'{who}-{mode}'}-{rep}"
    run_dir.mkdir(parents=True)
    command = [*side_command(side, settings, workdir, run_dir), *extra_overrides]
    child_env = {**env, "HF_DATASETS_CACHE": str(run_dir / "hf-datasets")}
    log = run_dir / "output.log"
    with log.open("w", encoding="utf-8") as out:
        launched = time.time()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir,
                                env=child_env)
        code, peak_rss_mb = wait_with_usage(proc, timeout)
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        error = SideInterrupted if code < 0 or code == PREEMPTED_EXIT_CODE else RuntimeError
        raise error(f"{report.SIDE_NAMES[side]} failed with exit code {code}:\n{tail}\n"
                    f"command: {shlex.join(command)}")
    (run_dir / "launch.json").write_text(json.dumps({
        "side": list(side), "rep": rep, "launched_unix": launched, "peak_rss_mb": peak_rss_mb}),
        encoding="utf-8")
    return read_run(run_dir, settings, stats)


def read_run(run_dir: Path, settings: workload.Settings,
             stats: dict[str, list[dict]]) -> report.RunResult:
    """The figures of a finished run from its folder: launch.json (side, repetition, launch
    time, peak RSS, written by run_side), result.json (the side's clock) and, for finetune,
    its metrics.jsonl; `stats` are the per-step counts of the saved batches."""
    launch = json.loads((run_dir / "launch.json").read_text(encoding="utf-8"))
    side = (launch["side"][0], launch["side"][1])
    who, mode = side
    clock = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    if who == "trl":
        step_tokens, losses = clock["step_tokens"], clock["losses"]
        step_padded = clock.get("step_padded")  # None: a workdir from before it was recorded
    else:
        step_tokens = [s["real"] for s in stats[mode]]
        step_padded = [s["rows"] * s["width"] for s in stats[mode]]
        losses = clock.get("losses") or _ours_losses(run_dir / "run", stats[mode])
    step_ends, step_cpu = clock["step_ends"], clock.get("step_cpu")
    if not len(step_tokens) == len(step_ends) == len(losses) == settings.steps:
        raise RuntimeError(f"{report.SIDE_NAMES[side]}: expected {settings.steps} steps, got "
                           f"{len(step_ends)} step times, {len(step_tokens)} token counts and "
                           f"{len(losses)} losses (see {run_dir / 'output.log'})")
    warmup = settings.timing_warmup
    timed_tokens = sum(step_tokens[warmup:])
    cpu = ((step_cpu[-1] - step_cpu[warmup - 1]) / timed_tokens * 1000 if step_cpu else None)
    return report.RunResult(
        side=side, tokens_per_s=workload.tokens_per_second(step_tokens, step_ends, warmup),
        startup_s=clock["first_step_end_unix"] - launch["launched_unix"],
        peak_rss_mb=launch["peak_rss_mb"], step_tokens=step_tokens,
        losses=losses, cpu_s_per_ktok=cpu,
        fill=timed_tokens / sum(step_padded[warmup:]) if step_padded else None,
        rep=launch["rep"], clock=clock, run_dir=run_dir)


def read_runs(workdir: Path, settings: workload.Settings,
              stats: dict[str, list[dict]]) -> list[report.RunResult]:
    """Every finished run of a kept workdir (runs/*/ with launch.json and result.json; runs
    stopped from outside have no result.json and are left out), in launch order."""
    finished = [d for d in (workdir / "runs").iterdir()
                if (d / "launch.json").is_file() and (d / "result.json").is_file()]
    finished.sort(key=lambda d: json.loads((d / "launch.json").read_text())["launched_unix"])
    return [read_run(d, settings, stats) for d in finished]


def run_side_retrying(side: tuple[str, str], settings: workload.Settings, workdir: Path,
                      rep: int, stats: dict[str, list[dict]], env: dict[str, str],
                      timeout: float, **kwargs) -> report.RunResult:
    """run_side, run once more in a new folder when a signal from outside stopped it (other
    jobs on a shared machine); a second interruption, or any other failure, is raised."""
    try:
        return run_side(side, settings, workdir, rep, stats, env, timeout, **kwargs)
    except SideInterrupted as exc:
        print(f"{str(exc).splitlines()[0]}: stopped from outside, running it again",
              flush=True)
        name = kwargs.pop("name", None) or f"{side[0]}-{side[1]}"
        return run_side(side, settings, workdir, rep, stats, env, timeout,
                        name=f"{name}-again", **kwargs)


def _ours_losses(run_dir: Path, stats: list[dict]) -> list[float]:
    """finetune's per-step losses from metrics.jsonl, after checking that it trained on the
    batches bench.py saved (the trained-token count of every step must match)."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    trained = [r["trained_tokens"] for r in records]
    expected = [s["trained"] for s in stats]
    if trained != expected:
        raise RuntimeError(f"finetune trained on other batches than the ones saved for the "
                           f"reference loop: trained tokens per step {trained} vs {expected}")
    return [r["loss"] for r in records]


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "prepare":
        sys.exit("usage: bench_runner.py prepare WORKDIR MODEL_DTYPE MODEL_DEVICE")
    try:
        _prepare_here(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    except workload.WorkloadError as exc:
        print(exc, flush=True)
        sys.exit(2)
