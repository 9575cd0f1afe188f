"""One side of scripts/bench.py: the reference loop, plain PyTorch + peft with no framework.

    python scripts/bench_reference.py WORKDIR MODE RESULT_JSON

Trains on exactly the micro-batches `finetune run lora_sft` trains on (bench.py saved them from
finetune's data pipeline into WORKDIR/batches/MODE/, MODE being `packed` or `unpacked`), with
the same model, precision, LoRA, AdamW variant, learning rate and gradient clipping, in the
smallest loop that does so: load a batch, forward under autocast, backward, clip, step. It is
the limit of this machine for this workload. Gradient checkpointing is on when settings.json
says so (scripts/bench_memory.py), enabled as finetune's setup does it. The seed is set before
the model is loaded and the adapter attached, in the order finetune's setup does it, so the
LoRA initialisation and hence the loss curve match finetune's. On a GPU the peak device memory
is recorded too.
"""

from __future__ import annotations

import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from bench_workload import load_side_model, read_side


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    workdir, mode, result_path = Path(argv[0]), argv[1], Path(argv[2])
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.kernels import TORCH_DTYPES

    settings, plan = read_side(workdir, mode)
    files = sorted((workdir / "batches" / mode).glob("*.pt"))
    random.seed(settings["seed"])
    np.random.seed(settings["seed"])
    torch.manual_seed(settings["seed"])
    model = load_side_model(workdir / "model", plan).to(plan["device"])
    if settings.get("gradient_checkpointing"):  # as finetune's setup: before the adapter
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
        target_modules="all-linear", bias="none", task_type="CAUSAL_LM"),
        autocast_adapter_dtype=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=plan["optimizer"] == "adamw_fused",
                                  foreach=plan["optimizer"] == "adamw_foreach")
    autocast = (torch.autocast(device_type=plan["device"], dtype=TORCH_DTYPES[plan["precision"]])
                if plan["autocast"] else nullcontext())
    model.train()
    step_ends, step_cpu, losses, first_unix = [], [], [], None
    for path in files:
        batch = {k: v.to(plan["device"]) if isinstance(v, torch.Tensor) else v
                 for k, v in torch.load(path, weights_only=True).items()}
        with autocast:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        step_ends.append(time.perf_counter())
        step_cpu.append(time.process_time())
        if first_unix is None:
            first_unix = time.time()
    result_path.write_text(json.dumps({"step_ends": step_ends, "step_cpu": step_cpu,
                                       "losses": losses, "first_step_end_unix": first_unix,
                                       "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30
                                                       if plan["device"] == "cuda" else None)}),
                           encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
