"""lora: `finetune run lora_sft` end to end, in a child process, on a ~1B Llama-shaped model."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .context import ROOT, Context
from .runner import Skip, needs


def write_llama_folder(ctx: Context, folder: Path, seq: int) -> int:
    """A ~1B Llama-shaped model (Llama 3.2 1B's layout, the built-in tokenizer's vocabulary),
    random init, saved as an ordinary model folder. Returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    gpu = ctx.gpu
    config = LlamaConfig(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=2048 if gpu else 64,
        intermediate_size=8192 if gpu else 128, num_hidden_layers=16 if gpu else 2,
        num_attention_heads=32 if gpu else 4, num_key_value_heads=8 if gpu else 2,
        max_position_embeddings=max(seq, 2048), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def lora_command(model_dir: Path, out_dir: Path, seq: int, steps: int,
                 nproc: int = 1) -> list[str]:
    """The `finetune run lora_sft` command of the lora section."""
    command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft",
               f"model.name_or_path={model_dir}", "data.packing=true",
               f"data.max_seq_len={seq}", f"trainer.max_steps={steps}",
               "trainer.micro_batch_size=4", "trainer.eval_every_n_steps=0",
               "trainer.save_every_n_steps=0", "optim=adamw", f"output_dir={out_dir}"]
    return command + ([f"--nproc={nproc}"] if nproc > 1 else [])


def lora_results(run_dir: Path, warmup_steps: int = 3) -> dict[str, Any]:
    """Throughput, MFU and memory of a finished run, from its metrics.jsonl and summary.json
    (the first `warmup_steps` steps are left out of the medians)."""
    result: dict[str, Any] = {}
    plan_file = run_dir / "kernel_plan.json"
    if plan_file.exists():
        kernels = json.loads(plan_file.read_text())["kernels"]
        result["kernels"] = {k: v["choice"] for k, v in kernels.items()}
        result["attention_selfcheck"] = kernels["attention"].get("selfcheck")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [r for r in rows if "tokens_per_s" in r][warmup_steps:]
        result["steps_measured"] = len(steps)
        for key in ("tokens_per_s", "mfu", "step_time_s"):
            values = [r[key] for r in steps if r.get(key) is not None]
            result[f"median_{key}"] = statistics.median(values) if values else None
        losses = [r["loss"] for r in rows if "loss" in r] or [None]
        result["first_loss"], result["last_loss"] = losses[0], losses[-1]
    summary = run_dir / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        result["peak_memory_gb"] = data.get("peak_memory_gb")
        result["trained_tokens_per_s"] = data.get("trained_tokens_per_s")
    return result


def run_command(ctx: Context, command: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Run `command` with this checkout importable; (result, its stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ctx.pythonpath, str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:  # the child is killed; what it wrote stays
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(
            errors="replace")
        result.update(returncode=None, timed_out_after_s=round(timeout, 1))
        return result, output
    result.update(returncode=proc.returncode, wall_s=round(time.monotonic() - started, 1))
    if proc.returncode != 0:
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result, proc.stdout


def section_lora(ctx: Context, out: dict[str, Any]) -> None:
    """`finetune run lora_sft` of a ~1B Llama (random init, no download), packed, seq 2048:
    tokens/s, MFU against the profile's peak, peak memory."""
    needs("hydra", "omegaconf", "orjson")  # `finetune run` composes its config and reads jsonl
    if ctx.args.skip_lora:
        raise Skip("--skip-lora")
    if ctx.args.dry_run:
        raise Skip("--dry-run (the command is built and its results parsed by a unit test)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_dir = Path(tmp) / "llama-1b", Path(tmp) / "run"
        out["parameters"] = write_llama_folder(ctx, model_dir, ctx.sizes.lora_seq)
        command = lora_command(model_dir, run_dir, ctx.sizes.lora_seq, ctx.sizes.lora_steps)
        out.update(run_command(ctx, command, max(ctx.time_left() - 5, 10))[0])
        out.update(lora_results(run_dir))
    if out["returncode"] != 0:  # None: timed out; the steps it logged are kept above
        raise RuntimeError(f"finetune run did not finish (exit status {out['returncode']})")
