"""scripts/bench.py --gpu: finetune at Llama-3-8B shape on one CUDA/ROCm GPU, every kernel the
plan offers, against TRL in the same run.

    python scripts/bench.py --gpu [--repeats 1] [--steps 12] [--batch 2] [--seq-len 2048]

The model is a random-init bf16 Llama with meta-llama/Meta-Llama-3-8B's shape (embedding and
LM head at the full 128,256 rows; the tiny tokenizer uses the first ids), LoRA r=16 on every
linear layer, packed rows of 2048 tokens. The baseline is finetune with the kernel plan's own
choices; each variant changes one family: every other attention candidate the plan offers,
Liger fused ops flipped (on <-> off), peft's LoRA forward instead of finetune's fused one, the
other AdamW (fused <-> foreach). TRL's SFTTrainer runs
with its packing and with its defaults on the plan's attention. Each run is a fresh process;
per run: real tokens/s (counted as on CPU), MFU (finetune.metrics.flops' model FLOPs of the
step's documents over the hardware profile's peak bf16 FLOP/s) and peak device memory
(torch.cuda.max_memory_allocated). Without a CUDA/ROCm GPU it stops with exit code 2.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bench_report as report
import bench_runner as runner
import bench_workload as workload


@dataclass(frozen=True)
class Variant:
    """One run of the --gpu table: a side and finetune's extra kernel overrides."""

    name: str
    side: tuple[str, str]
    overrides: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")


def gpu_variants(plan: dict) -> list[Variant]:
    """The runs of --gpu for a plan summary (bench_workload.plan_summary of the packed run):
    the plan's own choices, then one family changed at a time, then TRL."""
    offered = plan["offered"]
    attention, fused, optimizer = offered["attention"], offered["fused_ops"], offered["optimizer"]
    packed = ("ours", "packed")
    variants = [Variant(f"finetune, plan ({attention[0]}, fused_ops {fused[0]}, "
                        f"{optimizer[0]})", packed)]
    variants += [Variant(f"finetune, attention {name}", packed, (f"kernels.attention={name}",))
                 for name in attention[1:]]
    if "liger" in fused:
        flipped = "none" if fused[0] == "liger" else "liger"
        variants.append(Variant(f"finetune, fused_ops {flipped}", packed,
                                (f"kernels.fused_ops={flipped}",)))
    for other in offered["lora"][1:]:
        variants.append(Variant(f"finetune, LoRA forward {other}", packed,
                                (f"kernels.lora={other}",)))
    for other in ("adamw_fused", "adamw_foreach"):
        if other != optimizer[0] and other in optimizer:
            variants.append(Variant(f"finetune, optimizer {other}", packed,
                                    (f"kernels.optimizer={other}",)))
    variants += [Variant("TRL SFTTrainer, packing=True", ("trl", "packed")),
                 Variant("TRL SFTTrainer, defaults", ("trl", "unpacked"))]
    return variants


def model_flops(step_documents: Sequence[Sequence[int]], config, rank: int) -> list[float]:
    """Model FLOPs (finetune.metrics.flops) of each step's documents for a LoRA run of
    `rank` on every linear layer."""
    from finetune.metrics.flops import TrainingMode, step_flops

    mode = TrainingMode(full=False, adapters=workload.lora_adapters(config, rank))
    flops = [step_flops(config, mode, list(documents)) for documents in step_documents]
    if any(f is None for f in flops):
        raise ValueError("finetune.metrics.flops does not count this architecture")
    return [float(f) for f in flops]


def mfu(step_flops: Sequence[float], step_ends: Sequence[float], warmup: int,
        peak_tflops: float | None) -> float | None:
    """Model FLOPs of the steps after the warm-up over their wall time and the peak; None
    without a peak (the profile does not know this GPU)."""
    if not peak_tflops:
        return None
    seconds = step_ends[-1] - step_ends[warmup - 1]
    return sum(step_flops[warmup:]) / seconds / (peak_tflops * 1e12)


def peak_memory_gb(result: report.RunResult) -> float | None:
    """Peak device memory of a run: finetune's from its metrics.jsonl, TRL's from its result."""
    if result.side[0] == "trl":
        return result.clock.get("peak_mem_gb")
    path = result.run_dir / "run" / "metrics.jsonl" if result.run_dir else None
    if path is None or not path.is_file():
        return None
    values = [json.loads(line).get("peak_mem_gb") for line in path.read_text().splitlines()]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def gpu_table(rows: list[dict]) -> str:
    lines = ["| run | real tokens/s | MFU | peak memory (GiB) | start-up (s) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['name']} | failed: {row['error']} | | | |")
            continue
        mfu_text = f"{row['mfu']:.1%}" if row["mfu"] is not None else "unknown"
        memory = f"{row['peak_mem_gb']:.1f}" if row["peak_mem_gb"] is not None else "n/a"
        lines.append(f"| {row['name']} | {row['tokens_per_s']:,.0f} | {mfu_text} | {memory} | "
                     f"{row['startup_s']:.1f} |")
    return "\n".join(lines)


def main(args, settings: workload.Settings) -> int:
    """Run --gpu (args from bench.parse_args, settings from its "gpu" preset); returns 2
    without a CUDA/ROCm GPU."""
    import torch

    if not torch.cuda.is_available():
        print("error: --gpu needs a CUDA or ROCm GPU and torch sees none "
              "(torch.cuda.is_available() is False). Run scripts/bench.py without --gpu for the "
              "CPU benchmark.", file=sys.stderr)
        return 2
    env = runner.side_environment(os.environ, "inherit")
    config = workload.model_config(settings.size)
    with tempfile.TemporaryDirectory(prefix="finetune-bench-gpu-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing the {settings.size} model (bf16, built on the GPU) in {workdir}",
              flush=True)
        stats = runner.prepare(settings, workdir, env=env, timeout=args.timeout,
                               model_dtype="bf16", model_device="cuda")["stats"]
        plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))["packed"]
        peak = plan["hardware"]["peak_bf16_tflops"]
        runs: dict[str, list[dict]] = {}
        variants = gpu_variants(plan)
        for rep, variant in runner.run_order(variants, args.repeats):
            try:
                result = runner.run_side_retrying(
                    variant.side, settings, workdir, rep, stats, env, args.timeout,
                    extra_overrides=variant.overrides, name=variant.slug)
            except (RuntimeError, TimeoutError) as exc:
                print(f"{variant.name}: {exc}", flush=True)
                runs.setdefault(variant.name, []).append(
                    {"error": str(exc).splitlines()[0][:120]})
                continue
            documents = (result.clock["step_documents"] if variant.side[0] == "trl"
                         else [s["documents"] for s in stats[variant.side[1]]])
            flops = model_flops(documents, config, settings.lora_r)
            row = {"tokens_per_s": result.tokens_per_s, "startup_s": result.startup_s,
                   "mfu": mfu(flops, result.clock["step_ends"], settings.timing_warmup, peak),
                   "peak_mem_gb": peak_memory_gb(result)}
            print(f"run {rep + 1}/{args.repeats} {variant.name}: "
                  f"{row['tokens_per_s']:,.0f} real tokens/s", flush=True)
            runs.setdefault(variant.name, []).append(row)
    rows = [median_row(v.name, runs[v.name]) for v in variants if v.name in runs]
    speedups = trl_speedups(rows)
    print(gpu_table(rows))
    for name, value in speedups.items():
        print(f"{name}: {value:.3f}" if value is not None else f"{name}: not measured")
    line = {"gpu": plan["hardware"]["name"], "peak_bf16_tflops": peak, **speedups,
            "runs": {row["name"]: {k: row.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_gb",
                                                           "error")} for row in rows}}
    if not args.no_doc:
        doc = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else ""
        text = "\n".join([
            f"### gpu: {plan['hardware']['name']}", "",
            f"Measured {datetime.date.today().isoformat()}: Llama-3-8B shape (random init, "
            f"bf16), LoRA r={settings.lora_r} on every linear layer, packed rows of "
            f"{settings.max_seq_len}, micro-batch {settings.micro_batch_size}, "
            f"{settings.steps} steps of which {settings.timing_warmup} warm-up, "
            f"{args.repeats} run(s) each; torch {torch.__version__}; peak bf16 "
            f"{peak} TFLOP/s.", "", gpu_table(rows), "",
            *(f"- {name}: {value:.3f}" for name, value in speedups.items()
              if value is not None)])
        args.doc.write_text(report.replace_section(doc, "gpu", text), encoding="utf-8")
    print(json.dumps(line))
    return 0


def trl_speedups(rows: list[dict]) -> dict[str, float | None]:
    """finetune with the plan's choices (the first row) over TRL, in real tokens/s."""
    by_name = {row["name"]: row.get("tokens_per_s") for row in rows}
    ours = rows[0].get("tokens_per_s") if rows else None
    found = {}
    for key, name in (("speedup_vs_trl_packed", "TRL SFTTrainer, packing=True"),
                      ("speedup_vs_trl", "TRL SFTTrainer, defaults")):
        other = by_name.get(name)
        found[key] = ours / other if ours and other else None
    return found


def median_row(name: str, found: list[dict]) -> dict:
    """The medians of a variant's successful runs, or its first error when none succeeded."""
    ok = [row for row in found if "error" not in row]
    if not ok:
        return {"name": name, "error": found[0]["error"]}
    row: dict = {"name": name}
    for key in ("tokens_per_s", "startup_s", "mfu", "peak_mem_gb"):
        values = [r[key] for r in ok if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    return row
