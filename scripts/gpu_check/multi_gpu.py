"""multi_gpu: with 2+ GPUs, an all-reduce and a `finetune run --nproc 2`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .context import Context
from .lora_run import lora_results, run_command
from .runner import Skip, needs


def allreduce_worker() -> int:
    """One rank of the multi_gpu all-reduce (started by torchrun); rank 0 prints the result."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")  # RCCL on ROCm
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((64 * 2**20,), float(rank + 1), device="cuda")  # 256 MiB of fp32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    correct = bool((x == world * (world + 1) / 2).all())
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    if rank == 0:
        # ring all-reduce bus bandwidth: 2 (n - 1) / n of the buffer per rank
        bus_gbps = x.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9
        print(json.dumps({"world_size": world, "correct": correct,
                          "bus_bandwidth_gb_s": round(bus_gbps, 1)}))
    dist.destroy_process_group()
    return 0


def section_multi_gpu(ctx: Context, out: dict[str, Any]) -> None:
    """With 2+ GPUs: an all-reduce (correctness, bus bandwidth) and a `--nproc 2` run."""
    import torch

    count = torch.cuda.device_count() if ctx.gpu else 0
    if count < 2:
        raise Skip(f"needs 2+ GPUs; this machine has {count}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scripts.gpu_check", "--allreduce-worker"]
    result, stdout = run_command(ctx, command, min(60.0, ctx.time_left() / 2))
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    out["allreduce"] = {**result, **(json.loads(lines[-1]) if lines else {})}
    needs("hydra", "omegaconf", "orjson")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft", "trainer.max_steps=10",
                   f"output_dir={Path(tmp) / 'run'}", "--nproc=2"]
        out["nproc_2"] = run_command(ctx, command, max(ctx.time_left() - 5, 10))[0]
        out["nproc_2"].update(lora_results(Path(tmp) / "run", warmup_steps=1))
