"""Scaling benchmark: tokens/s on 1 vs 2 processes, DDP vs FSDP2, the share of a step spent
inside collectives, and peak memory per rank for a full fine-tune under DDP vs FSDP2.

    python scripts/bench_scaling.py                  # CPU: gloo, medium model (~30M params)
    python scripts/bench_scaling.py --size small --steps 6 --repeats 1   # a quick look

Every case is a real `finetune run` on the same model folder and data (built once in a
temporary folder by scripts/bench_workload.py), started under torchrun with the case's process
count and `distributed=` strategy, each rank in its own process. Per case, per repeat:

- tokens/s: the input tokens of the timed steps (after `--warmup`) over their step time, from
  rank 0's metrics.jsonl; medians over the repeats; ratio against the 1-process run of the
  same recipe, measured in the same invocation.
- collectives: every rank runs under torch.profiler; the time inside gloo/NCCL collective
  events (all-gather, reduce-scatter, all-reduce) divided by the step time. Collectives that
  overlap compute count in full, so this is an upper bound of what communication costs.
- peak memory: each rank's peak resident set size (ru_maxrss) at the end of the run. On a GPU
  it is the device's peak allocated memory.

Cases run in A/B order per repeat (1 proc, ddp, fsdp2 for LoRA, then full), so a slow moment
of the machine hits every case alike. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_workload as workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_PREFIXES = ("gloo:", "nccl:", "xccl:")

# (label, recipe, processes, strategy)
CASES = [
    ("lora 1 proc", "lora_sft", 1, "single"),
    ("lora 2 proc ddp", "lora_sft", 2, "ddp"),
    ("lora 2 proc fsdp2", "lora_sft", 2, "fsdp2"),
    ("full 1 proc", "full_sft", 1, "single"),
    ("full 2 proc ddp", "full_sft", 2, "ddp"),
    ("full 2 proc fsdp2", "full_sft", 2, "fsdp2"),
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(workload.SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8,
                        help="rows per optimizer step over all processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    if args.steps <= args.warmup + 1:
        parser.error("--steps must leave at least two timed steps after --warmup")
    return args


# ---------------------------------------------------------------- one rank


def worker(out: Path, recipe: str, overrides: list[str]) -> int:
    """Run the recipe on this rank under the profiler; write this rank's figures to `out`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetune.config.compose import compose_run_config
    from finetune.train.run import run_recipe

    cfg = compose_run_config(recipe, overrides)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        code = run_recipe(cfg)
    collective_us = sum(e.cpu_time_total for e in prof.events()
                        if e.name.startswith(COLLECTIVE_PREFIXES))
    rank = int(os.environ.get("RANK", "0"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}.json").write_text(json.dumps(
        {"rank": rank, "collective_s": collective_us / 1e6, "peak_mb": peak_mb}))
    return code


# ---------------------------------------------------------------- one case


def case_overrides(args: argparse.Namespace, recipe: str, nproc: int, strategy: str,
                   model_dir: Path, data: Path, cache: Path, run_dir: Path) -> list[str]:
    micro = args.global_batch // nproc
    overrides = [f"model.name_or_path={model_dir}", f"data.path={data}", "data.format=chat",
                 f"data.max_seq_len={args.seq_len}", "data.packing=true", "data.val_split=0",
                 f"data.cache_dir={cache}", f"trainer.max_steps={args.steps}",
                 f"trainer.micro_batch_size={micro}", "trainer.grad_accum_steps=1",
                 "trainer.eval_every_n_steps=0", "trainer.save_every_n_steps=0",
                 "optim.scheduler=constant", "optim.warmup_steps=0", f"distributed={strategy}",
                 "logger.display=plain", f"output_dir={run_dir}", *args.overrides]
    if recipe == "full_sft":
        overrides.append("optim.lr=1e-5")
    return overrides


def run_case(args: argparse.Namespace, case: tuple[str, str, int, str], workdir: Path,
             model_dir: Path, data: Path, rep: int) -> dict:
    label, recipe, nproc, strategy = case
    name = label.replace(" ", "_")
    run_dir, out = workdir / f"{name}-{rep}", workdir / f"{name}-{rep}-ranks"
    overrides = case_overrides(args, recipe, nproc, strategy, model_dir, data,
                               workdir / "cache", run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--worker",
               "--out", str(out), recipe, *overrides]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r][args.warmup:]
    step_s = sum(r["step_time_s"] for r in steps)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank_*.json"))]
    all_steps = sum(r["step_time_s"] for r in records if "step_time_s" in r)
    return {"case": label, "tokens_per_s": sum(r["tokens"] for r in steps) / step_s,
            "collective_share": (statistics.mean(r["collective_s"] for r in ranks) / all_steps
                                 if nproc > 1 else 0.0),
            "peak_mb_per_rank": [round(r["peak_mb"]) for r in ranks],
            "wall_s": time.monotonic() - started}


def summarise(results: list[dict]) -> list[dict]:
    """Medians per case, and the ratio against the 1-process run of the same recipe."""
    rows = []
    for label, *_ in CASES:
        mine = [r for r in results if r["case"] == label]
        rows.append({"case": label,
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                     "collective_share": statistics.median(r["collective_share"] for r in mine),
                     "peak_mb_per_rank": max((r["peak_mb_per_rank"] for r in mine),
                                             key=lambda m: max(m))})
    for row in rows:
        base = next(r for r in rows if r["case"] == row["case"].split()[0] + " 1 proc")
        row["vs_1_proc"] = row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | tokens/s | vs 1 proc | time in collectives | peak MB per rank |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['tokens_per_s']:.0f} | {r['vs_1_proc']:.2f}x | "
                     f"{100 * r['collective_share']:.0f}% | "
                     f"{', '.join(str(m) for m in r['peak_mb_per_rank'])} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        recipe, *overrides = args.overrides
        return worker(args.out, recipe, overrides)
    if args.global_batch % 2:
        raise SystemExit("--global-batch must be even (it is split over 2 processes)")
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = Path(tmp)
        model_dir = workload.build_model_folder(args.size, workdir / "model")
        from transformers import AutoTokenizer

        words = workload.vocabulary_words(AutoTokenizer.from_pretrained(model_dir))
        rows = workload.make_rows(2000, args.seq_len, words)
        data = workload.write_jsonl(rows, workdir / "train.jsonl")
        results = []
        for rep in range(args.repeats):
            for case in CASES:
                result = run_case(args, case, workdir, model_dir, data, rep)
                print(f"[{rep + 1}/{args.repeats}] {result['case']}: "
                      f"{result['tokens_per_s']:.0f} tokens/s, "
                      f"collectives {100 * result['collective_share']:.0f}%, peak MB per rank "
                      f"{result['peak_mb_per_rank']}", flush=True)
                results.append(result)
        rows = summarise(results)
    params = workload.parameter_count(workload.model_config(args.size))
    print()
    print(f"model {args.size} ({params / 1e6:.1f}M params), seq {args.seq_len} packed, global "
          f"batch {args.global_batch}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.repeats} repeats; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print(table(rows))
    print(json.dumps({"size": args.size, "params": params, "cases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
