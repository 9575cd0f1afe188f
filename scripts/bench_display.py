"""Benchmark: what the run monitor (live display, metrics.jsonl, FLOP count, memory reading)
costs a training step.

Trains a LoRA adapter on a Llama of the built-in tiny model's shape (or --hidden/--layers) with
fixed random batches, in rounds of --steps steps alternating off / on (A/B/A/B ...) in one
process: "off" runs the bare step; "on" also counts the step's FLOPs from the CPU batch and
hands the record to a RunMonitor whose live display draws (to a terminal-like console writing
to /dev/null, refreshed by rich's thread) and which writes metrics.jsonl. Both arms read the
loss, as the loop does. Prints tokens/s per round, the medians and their ratio (on / off),
and the time spent inside the monitor's calls per step (robust on a busy machine, where the
ratio is noisy; it leaves out the display's refresh thread, which the ratio includes).

    python scripts/bench_display.py --rounds 6 --steps 20
    python scripts/bench_display.py --device cuda --hidden 1024 --layers 8 --seq 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from finetune.config.compose import compose_run_config
from finetune.metrics.monitor import RunMonitor


class _Accelerator:
    """What a RunMonitor needs of an Accelerator, without trackers (none are configured)."""

    is_main_process = True
    num_processes = 1
    log_with: list = []
    trackers: list = []

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def init_trackers(self, project_name: str, config: dict | None = None) -> None:
        """No trackers to start."""

    def log(self, values: dict, step: int | None = None) -> None:
        """No trackers to log to."""


def build(args: argparse.Namespace, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64, vocab_size=args.vocab)
    model = LlamaForCausalLM(config).to(device)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
        positions = torch.arange(args.seq).repeat(args.batch, 1)
        batches.append({"input_ids": ids, "labels": ids.clone(), "position_ids": positions})
    return model, optimizer, batches


def run_round(model, optimizer, batches, steps: int, device: torch.device,
              monitor: RunMonitor | None, first_step: int) -> tuple[float, float]:
    """(tokens per second over `steps` optimizer steps, monitor time included; seconds spent
    in the monitor's calls)."""
    tokens, in_monitor = 0, 0.0
    started = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        cpu_batch = batches[i % len(batches)]
        flops = monitor.step_flops([cpu_batch]) if monitor else None
        in_monitor += time.perf_counter() - t0
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # the loop reads the loss every step, display or not
        n = cpu_batch["input_ids"].numel()
        tokens += n
        if monitor is not None:
            t1 = time.perf_counter()
            monitor.step({"step": first_step + i, "loss": loss_value, "lr": 1e-4,
                          "grad_norm": 1.0, "tokens": n, "trained_tokens": n,
                          "step_time_s": t1 - t0, "data_wait_s": 0.0, "epoch": 0}, flops=flops)
            in_monitor += time.perf_counter() - t1
    return tokens / (time.perf_counter() - started), in_monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds, alternating off/on")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, optimizer, batches = build(args, device)
    run_round(model, optimizer, batches, 3, device, None, 0)  # warm-up
    cfg = compose_run_config("lora_sft", ["logger.display=live"])
    from finetune.hardware import detect
    from finetune.kernels import plan

    kernel_plan = plan(detect(), cfg.kernels)
    results: dict[str, list[float]] = {"off": [], "on": []}
    monitor_seconds, monitor_steps = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        step = 1
        for round_index in range(args.rounds):
            arm = "off" if round_index % 2 == 0 else "on"
            monitor = None
            if arm == "on":
                console = Console(file=devnull, force_terminal=True, width=140)
                monitor = RunMonitor(cfg, Path(tmp), _Accelerator(device), kernel_plan,
                                     console=console)
                monitor.start(model, total_steps=args.rounds * args.steps, start_step=step - 1,
                              data_stats={}, config={})
            speed, seconds = run_round(model, optimizer, batches, args.steps, device, monitor,
                                       step)
            step += args.steps
            if monitor is not None:
                monitor.close()
                monitor_seconds += seconds
                monitor_steps += args.steps
            results[arm].append(speed)
            print(f"round {round_index + 1} ({arm:>3}): {speed:,.0f} tokens/s", flush=True)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    step_s = args.batch * args.seq / off
    per_step = monitor_seconds / max(monitor_steps, 1)
    print(f"median off: {off:,.0f} tokens/s; median on: {on:,.0f} tokens/s; "
          f"ratio on/off: {on / off:.3f} ({args.device}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.batch} x {args.seq} tokens a step)")
    print(f"in the monitor: {per_step * 1e3:.2f} ms per step, {per_step / step_s:.2%} of a "
          f"{step_s * 1e3:.0f} ms step")


if __name__ == "__main__":
    main()
