"""Matmul throughput in bf16 against fp32 on this machine's CPU (or GPU with --device).

    python scripts/bench_matmul.py [--shapes 2048x512x1792,4096x4096x4096] [--repeats 10]

The kernel plan picks bf16 on a CPU only with AMX-BF16 (finetune/kernels/precision.py): with
AVX512-BF16 alone, oneDNN's bf16 matmul runs slower than MKL's fp32 one. This prints, per shape
(M x K x N), the median GFLOP/s of each dtype over `--repeats` timed products (after 3 warm-up
ones, alternating the dtypes), the ratio bf16 / fp32, and one JSON line last. A ratio above 1
is what bf16 gains; below 1, fp32 is the faster precision here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxKxN, e.g. 2048x512x1792")
        shapes.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return shapes


def measure(shape: tuple[int, int, int], repeats: int, device: str) -> dict[str, float]:
    """Median GFLOP/s of bf16 and fp32 products of `shape`, timed alternately."""
    import torch

    m, k, n = shape
    operands = {dtype: (torch.randn(m, k, device=device, dtype=dtype),
                        torch.randn(k, n, device=device, dtype=dtype))
                for dtype in (torch.bfloat16, torch.float32)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in operands}
    for i in range(3 + repeats):
        for dtype, (a, b) in operands.items():
            sync()
            start = time.perf_counter()
            a @ b
            sync()
            if i >= 3:
                times[dtype].append(time.perf_counter() - start)
    rate = {dtype: 2 * m * k * n / statistics.median(found) / 1e9 for dtype, found in times.items()}
    return {"bf16_gflops": round(rate[torch.bfloat16], 2),
            "fp32_gflops": round(rate[torch.float32], 2),
            "bf16_over_fp32": round(rate[torch.bfloat16] / rate[torch.float32], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shapes,
                        default=parse_shapes("2048x512x1792,2048x1792x512,4096x4096x4096"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch

    results = {}
    for shape in args.shapes:
        name = "x".join(map(str, shape))
        results[name] = found = measure(shape, args.repeats, args.device)
        print(f"{name}: bf16 {found['bf16_gflops']:,.1f} GFLOP/s, fp32 "
              f"{found['fp32_gflops']:,.1f} GFLOP/s, bf16/fp32 {found['bf16_over_fp32']:.3f}",
              flush=True)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "shapes": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
