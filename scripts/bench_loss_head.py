"""Peak memory and time of the LM head + loss: the chunked path against the unfused one.

    python scripts/bench_loss_head.py [--vocab 128256] [--hidden 256] [--tokens 2048]
                                      [--steps 3] [--trainable-head] [--dtype fp32|bf16]

Each path runs in a fresh process (so that its peak resident memory is its own): forward and
backward of the head and the summed cross-entropy over `--tokens` positions, the head frozen
(LoRA) unless `--trainable-head`. It prints, per path, the peak RSS above what the process held
once its inputs were built, and the median step time (wall and CPU); then one JSON line with
both and the ratios. The numbers depend on the machine and its load; compare paths from the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run_path(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from finetune.kernels.chunked_loss import linear_cross_entropy

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    # Built in place, so that setup leaves no high-water mark above what it holds.
    hidden = torch.empty(args.tokens, args.hidden, dtype=dtype).normal_().requires_grad_()
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype).normal_(0.0, 0.02)
    weight.requires_grad_(args.trainable_head)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    targets[: args.tokens // 4] = -100  # a prompt share the loss skips

    def step() -> float:
        if args.path == "chunked":
            loss = linear_cross_entropy(hidden, weight, targets)
        else:
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.item()

    baseline = _rss_mb()
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    # CPU time too: on a machine shared with other jobs, wall time mostly measures their load.
    return {"path": args.path, "peak_mb": round(_peak_rss_mb() - baseline, 1),
            "step_s": round(statistics.median(times[1:]), 4),
            "cpu_s": round(statistics.median(cpu_times[1:]), 4), "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--trainable-head", action="store_true")
    parser.add_argument("--path", choices=["chunked", "unfused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(run_path(args)))
        return
    results = {}
    for path in ("unfused", "chunked"):
        child = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
        r = results[path]
        print(f"{path:8s} peak {r['peak_mb']:8.1f} MB above the inputs, "
              f"step {r['step_s'] * 1000:8.1f} ms, CPU {r['cpu_s'] * 1000:8.1f} ms (medians of "
              f"{args.steps}), loss {r['loss']:.6f}")
    unfused, chunked = results["unfused"], results["chunked"]
    summary = {
        "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens, "dtype": args.dtype,
        "trainable_head": args.trainable_head,
        "unfused_peak_mb": unfused["peak_mb"], "chunked_peak_mb": chunked["peak_mb"],
        "peak_saved": round(1 - chunked["peak_mb"] / max(unfused["peak_mb"], 1e-9), 3),
        "unfused_step_s": unfused["step_s"], "chunked_step_s": chunked["step_s"],
        "speedup": round(unfused["step_s"] / chunked["step_s"], 3),
        "unfused_cpu_s": unfused["cpu_s"], "chunked_cpu_s": chunked["cpu_s"],
        "cpu_speedup": round(unfused["cpu_s"] / chunked["cpu_s"], 3),
        "loss_rel_diff": abs(chunked["loss"] - unfused["loss"]) / abs(unfused["loss"]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
