"""Validate the kernel plan on a real GPU and print one JSON report (under 5 minutes).

    python scripts/gpu_check.py [--out report.json] [--seq 2048] [--layers 16] [--skip-lora]

Sections (each catches and reports its own failure instead of stopping the script):
  detection   the detected HardwareProfile and the auto kernel plan
  attention   every attention candidate supported here: its self-check, and the median
              forward+backward step time of a 1B-class Llama (random init, bf16, seq 2048)
  optimizer   fused vs foreach AdamW step time over the same parameter shapes (fp32)
  liger       fused ops on vs off, when liger_kernel imports
  lora        a 20-step `finetune run lora_sft` with the auto plan (subprocess)
Times are medians of a few steps after one warm-up step; ratios are within this process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUDGET_S = 280.0


class Budget:
    """Wall-clock budget; sections that would start too late are skipped, not run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(report: dict[str, Any], name: str, budget: Budget, needs_s: float,
                fn: Callable[[], Any]) -> None:
    """Run one section into report[name]; record the error or a skip instead of raising."""
    if budget.left() < needs_s:
        report[name] = {"status": f"skipped: {budget.left():.0f}s left, needs ~{needs_s:.0f}s"}
        return
    started = time.monotonic()
    try:
        report[name] = {"status": "ok", **fn()}
    except Exception as exc:
        report[name] = {
            "status": f"failed: {type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=4),
        }
    report[name]["seconds"] = round(time.monotonic() - started, 1)


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for queued work on `device` (a no-op on CPU)."""
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    if device == "xpu":
        return torch.xpu.synchronize
    return lambda: None


def median_time(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    """Median seconds of `steps` calls after one warm-up call."""
    step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=args.seq,
    )


def fwd_bwd_step_time(args: argparse.Namespace, attn: str, device: str,
                      patch_model: Callable[[Any], None] | None = None) -> float:
    """Median fwd+bwd seconds of a random-init bf16 Llama with attn_implementation=attn."""
    import torch

    seconds = _measure_fwd_bwd(args, attn, device, patch_model)
    if device == "cuda":
        torch.cuda.empty_cache()  # the model is gone once _measure_fwd_bwd returns
    return seconds


def _measure_fwd_bwd(args: argparse.Namespace, attn: str, device: str,
                     patch_model: Callable[[Any], None] | None) -> float:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM._from_config(
            llama_config(args), attn_implementation=attn, dtype=torch.bfloat16
        )
    if patch_model is not None:
        patch_model(model)
    model.train()
    ids = torch.randint(0, 32000, (1, args.seq), device=device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return median_time(step, args.steps, device_sync(device))


def section_detection() -> dict[str, Any]:
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.kernels import ModelFacts, format_plan_table, plan

    profile = detect()
    kernel_plan = plan(profile, KernelsConfig(), ModelFacts(32, 8, 64))
    print(format_plan_table(kernel_plan), file=sys.stderr)
    return {"plan": kernel_plan.to_dict()}


def section_attention(args: argparse.Namespace) -> dict[str, Any]:
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.hardware.arch import device_type
    from finetune.kernels import ATTENTION, ModelFacts, plan
    from finetune.kernels.selfcheck import check_attention

    profile = detect()
    device = device_type(profile)
    precision = plan(profile, KernelsConfig(selfcheck=False)).choice("precision")
    facts = ModelFacts(32, 8, 64, dtype=precision)
    results: dict[str, Any] = {}
    for candidate in ATTENTION.ranked(profile):
        ok, why = candidate.supports(profile, facts)
        entry: dict[str, Any] = {"supported": ok, "reason": why}
        if ok:
            failure = check_attention(candidate, facts, device)
            entry["selfcheck"] = "passed" if failure is None else f"failed: {failure}"
            try:
                entry["fwd_bwd_s"] = round(fwd_bwd_step_time(args, candidate.name, device), 4)
            except Exception as exc:
                entry["fwd_bwd_s"] = f"failed: {type(exc).__name__}: {exc}"
        results[candidate.name] = entry
    timed = {k: v["fwd_bwd_s"] for k, v in results.items()
             if isinstance(v.get("fwd_bwd_s"), float)}
    if "sdpa" in timed:
        results["speedup_vs_sdpa"] = {k: round(timed["sdpa"] / t, 3) for k, t in timed.items()}
    return {"model": f"llama hidden 2048, {args.layers} layers, 32/8 heads, seq {args.seq}",
            "candidates": results}


def section_optimizer(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from finetune.kernels import build_optimizer

    config = llama_config(args)
    with torch.device("meta"):
        shapes = [p.shape for p in LlamaForCausalLM(config).parameters()]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    times = {}
    for choice in ("adamw_fused", "adamw_foreach"):
        optimizer = build_optimizer(choice, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0)
        times[choice] = round(median_time(optimizer.step, args.steps, torch.cuda.synchronize), 4)
        del optimizer
    n = sum(p.numel() for p in params)
    return {"params": n, "step_s": times,
            "fused_speedup": round(times["adamw_foreach"] / times["adamw_fused"], 3)}


def section_liger(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return {"status": "skipped: liger_kernel is not installed"}
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.kernels import apply_fused_ops, plan

    kernel_plan = plan(detect(), KernelsConfig(fused_ops="liger", selfcheck=False))
    attn = kernel_plan.attn_implementation
    off = fwd_bwd_step_time(args, attn, "cuda")  # before any patch: Liger patches classes
    ops = kernel_plan.fused_ops
    applied: list[str] = []
    on = fwd_bwd_step_time(args, attn, "cuda",
                           patch_model=lambda m: applied.extend(apply_fused_ops(m, ops)))
    return {"attention": attn, "ops": applied, "off_s": round(off, 4), "on_s": round(on, 4),
            "speedup": round(off / on, 3)}


def section_lora(timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft",
                   "trainer.max_steps=20", f"output_dir={out}"]
        t0 = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result: dict[str, Any] = {"command": " ".join(command[1:]), "returncode": proc.returncode,
                                  "wall_s": round(time.monotonic() - t0, 1)}
        if proc.returncode != 0:
            result["status"] = "failed"
            result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        plan_file = out / "kernel_plan.json"
        if plan_file.exists():
            kernels = json.loads(plan_file.read_text())["kernels"]
            result["kernels"] = {k: v["choice"] for k, v in kernels.items()}
            result["attention_selfcheck"] = kernels["attention"].get("selfcheck")
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            result["steps_logged"] = len(lines)
            result["last_metrics"] = lines[-1] if lines else None
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--layers", type=int, default=16, help="Llama layers (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget")
    parser.add_argument("--skip-lora", action="store_true", help="skip the 20-step LoRA run")
    args = parser.parse_args(argv)

    import torch

    report: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    budget = Budget(args.budget_s)
    run_section(report, "detection", budget, 5, section_detection)
    if not torch.cuda.is_available():
        report["status"] = "no CUDA/ROCm device: only detection ran"
    else:
        run_section(report, "attention", budget, 60, lambda: section_attention(args))
        run_section(report, "optimizer", budget, 20, lambda: section_optimizer(args))
        run_section(report, "liger", budget, 30, lambda: section_liger(args))
        if not args.skip_lora:
            run_section(report, "lora", budget, 30,
                        lambda: section_lora(max(budget.left() - 5, 10)))
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
