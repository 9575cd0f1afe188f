"""Speed proof: `finetune run lora_sft` against a plain PyTorch loop and TRL's SFTTrainer.

    python scripts/bench.py [--size small|medium] [--repeats 3] [--precision plan|bf16|fp32]
    python scripts/bench.py --quick        # small model, < 5 minutes on 2 cores
    python scripts/bench.py --gpu          # Llama-3-8B shape on one CUDA/ROCm GPU
    python scripts/bench.py --quick --model DIR --data FILE.jsonl   # your model and data

Builds a random-init Llama folder with the built-in tiny tokenizer and a chat dataset with a
long tail of lengths (scripts/bench_workload.py), or takes your model folder (`--model`) and
your data (`--data`, JSON lines in any supervised format finetune reads), then runs each side in its own fresh process,
A/B/A/B (the order rotates every repetition): finetune with packing off and on (the real CLI),
the reference loop on exactly finetune's batches (bench_reference.py), and TRL with its defaults
and with its packing (bench_trl.py), all with the same model, precision, LoRA, optimizer, learning
rate, sequence length and micro-batch size. Prints the medians per side, the ratios, a PASS/MISS
line per target, writes the table into docs/benchmarks.md, and prints one JSON line last.

Counting, the same for every side: real tokens are the tokens of a batch that belong to a
document (bench_workload.real_tokens); tokens/s is the real tokens of the steps after the
warm-up over the wall time from the end of the last warm-up step to the end of the last step;
start-up is from the launch of the process to the end of its first optimizer step; peak RSS
is the process's ru_maxrss, read by this script from wait4.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import bench_report as report
import bench_runner as runner
import bench_workload as workload

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PRESETS = {
    "quick": workload.Settings(size="small", max_seq_len=256, micro_batch_size=8, steps=8,
                               timing_warmup=2, rows=400),
    "small": workload.Settings(size="small", max_seq_len=256, micro_batch_size=8, steps=16,
                               timing_warmup=3, rows=1000),
    "medium": workload.Settings(size="medium", max_seq_len=512, micro_batch_size=4, steps=14,
                                timing_warmup=3, rows=800),
    # --gpu: meta-llama/Meta-Llama-3-8B's shape, packed rows of 2048 tokens.
    "gpu": workload.Settings(size="llama3_8b", max_seq_len=2048, micro_batch_size=2, steps=12,
                             timing_warmup=3, rows=600),
    # For tests of this script: seconds per side.
    "smoke": workload.Settings(size="small", max_seq_len=64, micro_batch_size=2, steps=3,
                               timing_warmup=1, rows=60),
}
ALL_SIDES = [("ours", "unpacked"), ("ours", "packed"), ("reference", "packed"),
             ("reference", "unpacked"), ("trl", "unpacked"), ("trl", "packed")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "medium"], default="medium")
    parser.add_argument("--quick", action="store_true",
                        help="small model, fewer steps and no unpacked reference run")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true",
                        help="Llama-3-8B shape on one GPU: attention, Liger, AdamW variants, TRL")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (preset's if unset)")
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int, help="micro-batch size")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--precision", choices=["plan", "bf16", "fp32"], default="plan")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out (its keys: null)")
    parser.add_argument("--model", type=Path, metavar="DIR",
                        help="your Hugging Face model folder instead of the preset's random "
                             "Llama (the preset still sets steps, lengths and batch size)")
    parser.add_argument("--data", type=Path, metavar="FILE.jsonl",
                        help="your data instead of the generated chat rows: JSON lines in a "
                             "supervised format finetune reads (chat, alpaca, sharegpt, "
                             "prompt/completion)")
    parser.add_argument("--sides", type=parse_sides,
                        help="only these sides, e.g. ours:packed,reference:packed")
    parser.add_argument("--doc", type=Path,
                        help="markdown file whose section for this configuration is updated "
                             "(default docs/benchmarks.md; with --model or --data, none)")
    parser.add_argument("--no-doc", action="store_true", help="do not write the doc")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--summarize", type=Path, metavar="WORKDIR",
                        help="print and record the figures of a run kept with --keep, "
                             "running nothing")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"],
                        default="passive",
                        help="OMP_WAIT_POLICY of every side (inherit: this shell's)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if (args.model or args.data) and args.gpu:
        parser.error("--gpu builds its own Llama-3-8B-shaped model; to measure your model or "
                     "data on a GPU, leave --gpu out (every side runs on the plan's device)")
    if args.model and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model folder (no config.json there)")
    if args.data and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    # Figures of your own model or data go to the doc you name, never into this repo's.
    args.doc_given = args.doc is not None
    if args.doc is None and not (args.model or args.data):
        args.doc = DOC
    args.no_doc = args.no_doc or args.doc is None
    return args


def parse_sides(text: str) -> list[tuple[str, str]]:
    """`who:mode,...` (e.g. ours:packed,trl:unpacked) as sides of ALL_SIDES."""
    sides = [tuple(item.strip().split(":", 1)) for item in text.split(",") if item.strip()]
    unknown = [":".join(side) for side in sides if side not in ALL_SIDES]
    if unknown or not sides:
        raise argparse.ArgumentTypeError(
            f"unknown side(s) {', '.join(unknown) or text!r}; sides are "
            f"{', '.join(':'.join(side) for side in ALL_SIDES)}")
    return sides  # type: ignore[return-value]


def preset_name(args: argparse.Namespace) -> str:
    return ("gpu" if args.gpu else "smoke" if args.smoke else "quick" if args.quick
            else args.size)


def settings_from_args(args: argparse.Namespace) -> workload.Settings:
    """The preset of --quick/--smoke/--size with the explicit options on top."""
    changes = {name: value for name, value in (
        ("steps", args.steps), ("timing_warmup", args.warmup), ("max_seq_len", args.seq_len),
        ("micro_batch_size", args.batch), ("lr", args.lr)) if value is not None}
    for name in ("model", "data"):
        if getattr(args, name) is not None:
            changes[name] = str(getattr(args, name).resolve())
    return replace(PRESETS[preset_name(args)], precision=args.precision, **changes)


def trl_refusal(args: argparse.Namespace) -> str | None:
    """Why the TRL sides cannot run here (None: they can): --model's chat template lacks the
    {% generation %} markers that TRL's assistant-only loss needs, or TRL is not installed."""
    if not any(who == "trl" for who, _ in sides_for(args)):
        return None
    if args.model is not None and not re.search(
            r"{%-?\s*generation\s*-?%}", workload.chat_template_text(args.model) or ""):
        return (f"--model {args.model}: its chat template has no {{% generation %}} markers, "
                "which TRL's assistant-only loss (finetune trains the answers only) needs; "
                "pass --no-trl, or add the markers to the template")
    # Looked up, not imported: this process stays small (see bench_runner.prepare).
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed: pip install -e '.[bench]' (or pass --no-trl)"
    return None


def sides_for(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The sides to run: --sides, else all of ALL_SIDES without the unpacked reference in
    --quick/--smoke; never TRL under --no-trl."""
    sides = list(args.sides or ALL_SIDES)
    if (args.quick or args.smoke) and not args.sides:
        sides.remove(("reference", "unpacked"))
    if args.no_trl:
        sides = [s for s in sides if s[0] != "trl"]
    return sides


# ---------------------------------------------------------------- the report


def machine_facts() -> dict[str, object]:
    """CPU model, usable cores, native bf16 and the versions of the libraries every side uses,
    for the doc (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    from finetune.hardware.detect import cpu_has_amx, cpu_has_native_bf16, read_cpu_flags

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            versions[package] = version(package).split("+")[0]
        except PackageNotFoundError:
            versions[package] = "not installed"
    flags = read_cpu_flags()
    return {"cpu": name, "cores": cores, "bf16_native": cpu_has_native_bf16(flags),
            "amx": cpu_has_amx(flags), "versions": versions}


def recorded_command(argv: list[str]) -> str:
    """The command line for the doc, without the options that only say where files go."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--doc", "--keep", "--summarize"):
            skip = True
        elif not arg.startswith(("--doc=", "--keep=", "--summarize=")) and arg != "--no-doc":
            kept.append(arg)
    return shlex.join(["python", "scripts/bench.py", *kept])


def doc_section(args: argparse.Namespace, argv: list[str], settings: workload.Settings,
                summary: dict, found: list[report.Target], lengths: dict[str, float],
                plan: dict, load: tuple[float, float],
                parity: Sequence[str] = ()) -> tuple[str, str]:
    """(label, markdown) of this run's section of docs/benchmarks.md."""
    machine = machine_facts()
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    model, data = workload_names(settings)
    params = (lengths.get("parameters") if settings.model
              else workload.parameter_count(workload.model_config(settings.size)))
    precision = plan["precision"]
    label = f"{preset_name(args)}-{precision}"
    for name in filter(None, (model, data)):  # your model or data keeps its own section
        label += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if args.sides:  # a partial run keeps its own section
        label += "-" + "-".join(f"{who}_{mode}" for who, mode in args.sides)
    described = (f"{model} ({params / 1e6:.1f}M parameters)" if model and params
                 else model or f"{params / 1e6:.1f}M-parameter Llama (random init)")
    shared = ("above the core count: the machine was shared with other jobs"
              if max(load) > machine["cores"] else "at or below the core count")
    lines = [
        f"### {preset_name(args)}: {model or settings.size + ' model'}, {precision}", "",
        f"Measured {datetime.date.today().isoformat()} with `{recorded_command(argv)}`.", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, native bf16: "
        f"{'yes' if machine['bf16_native'] else 'no'} (AMX: "
        f"{'yes' if machine.get('amx') else 'no'}); {versions}. Load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end ({shared}).",
        f"- Workload: {described}, LoRA "
        f"r={settings.lora_r} alpha={settings.lora_alpha} on every linear layer; {precision} "
        f"(base weights {plan['base_dtype']}, fp32 adapters, autocast "
        f"{'on' if plan['autocast'] else 'off'}); attention {plan['attention']}, optimizer "
        f"{plan['optimizer']}; seq {settings.max_seq_len}, micro-batch "
        f"{settings.micro_batch_size}, {settings.steps} steps of which {settings.timing_warmup} "
        f"warm-up, lr {settings.lr:g} constant; {lengths.get('rows', settings.rows)} "
        f"{'rows of ' + data if data else 'chat rows'} of median "
        f"{lengths['median']:.0f} tokens (p90 {lengths['p90']:.0f}, p99 {lengths['p99']:.0f}, "
        f"max {lengths['max']}); {args.repeats} run(s) per side, each a fresh process, "
        f"OMP_WAIT_POLICY {args.omp_wait_policy}.", "",
        report.markdown_table(summary), "",
        "Targets (wall-clock tokens/s, peak RSS, start-up):", "",
        *(f"- {t.line()}" for t in found), "",
        "The same comparisons in CPU time per real token (above 1: ours ahead):", "",
        *(f"- {line}" for line in report.cpu_ratios(summary)),
        *(["", *(f"- {line}" for line in parity)] if parity else []),
    ]
    return label, "\n".join(lines) + "\n"


def workload_names(settings: workload.Settings) -> tuple[str | None, str | None]:
    """The names of the user's model folder and data file (None: the preset's own)."""
    return (Path(settings.model).name if settings.model else None,
            Path(settings.data).name if settings.data else None)


def print_summary(summary: dict, found: list[report.Target],
                  results: list[report.RunResult]) -> None:
    print(report.markdown_table(summary))
    for line in [*report.loss_parity(results), *report.cpu_ratios(summary)]:
        print(line)
    for target in found:
        print(target.line())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.summarize:
        return summarize_kept(args)
    settings = settings_from_args(args)
    if args.gpu:
        import bench_gpu

        return bench_gpu.main(args, settings)
    refusal = trl_refusal(args)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    env = runner.side_environment(os.environ, args.omp_wait_policy)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing the {settings.size} model, data and finetune's batches in {workdir}",
              flush=True)
        try:
            prepared = runner.prepare(settings, workdir, env=env, timeout=args.timeout)
        except workload.WorkloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results = []
        for rep, side in runner.run_order(sides_for(args), args.repeats):
            result = runner.run_side_retrying(side, settings, workdir, rep, prepared["stats"],
                                              env, args.timeout)
            print(f"run {rep + 1}/{args.repeats} {report.SIDE_NAMES[side]}: "
                  f"{result.tokens_per_s:,.0f} real tokens/s, start-up {result.startup_s:.1f} s, "
                  f"peak RSS {result.peak_rss_mb:,.0f} MB", flush=True)
            results.append(result)
        load = (load_start, os.getloadavg()[0])
        (workdir / "run.json").write_text(json.dumps({"argv": argv, "load": load}),
                                          encoding="utf-8")
        plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))["packed"]
    return publish(args, argv, settings, results, prepared["lengths"], plan, load)


def summarize_kept(args: argparse.Namespace) -> int:
    """--summarize WORKDIR: the figures of a run kept with --keep, read from its files (its
    command line and load from run.json), printed and recorded as that run would have."""
    workdir = args.summarize
    kept = json.loads((workdir / "run.json").read_text(encoding="utf-8"))
    run_args = parse_args(kept["argv"])
    if args.doc_given or args.no_doc:
        run_args.doc, run_args.no_doc = args.doc, args.no_doc
    settings = workload.Settings.from_json(
        json.loads((workdir / "settings.json").read_text(encoding="utf-8")))
    prepared = json.loads((workdir / "prepared.json").read_text(encoding="utf-8"))
    plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))["packed"]
    results = runner.read_runs(workdir, settings, prepared["stats"])
    return publish(run_args, kept["argv"], settings, results, prepared["lengths"], plan,
                   tuple(kept["load"]))


def publish(args: argparse.Namespace, argv: list[str], settings: workload.Settings,
            results: list[report.RunResult], lengths: dict[str, float], plan: dict,
            load: tuple[float, float]) -> int:
    """Print the table, ratios and target lines, update the doc, print the JSON line last."""
    summary = report.summarize(results)
    found = report.targets(summary, settings.size)
    print_summary(summary, found, results)
    if not args.no_doc:
        label, text = doc_section(args, argv, settings, summary, found, lengths, plan, load,
                                  report.loss_parity(results))
        doc = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else ""
        args.doc.write_text(report.replace_section(doc, label, text), encoding="utf-8")
        print(f"wrote the {label} section of {args.doc}")
    print(json.dumps(report.json_line(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
