"""Batch layouts against each other: padded rows vs padding-free rows (unpacked), and packed rows
with a block-diagonal 4D mask (`sdpa`) vs one SDPA call per document (`sdpa_varlen`); finetune's
loss (LM head only where a trained token is predicted) vs logits at every position; and
finetune's fused LoRA forward (`kernels.lora=fused`) vs peft's own.

    python scripts/bench_layout.py [--size medium] [--steps 8] [--repeats 3] [--precision plan]
                                   [--vocab N] [--profile]

Builds scripts/bench.py's workload (random-init Llama, lognormal chat rows), then lets
finetune's data pipeline collate the same examples four ways (`data.padding_free=off` with
`kernels.attention=sdpa`, the default padding-free rows with `sdpa_varlen`, and the same two
attentions with `data.packing=true`). In one process, alternating the layouts (A/B/A/B, the
order rotated each repetition), it times forward + backward (finetune's loss) over each
layout's first `--steps` micro-batches and prints the median CPU seconds, the ratios, and
whether the two layouts of a mode gave the same losses; one JSON line last. The fifth case runs
the padding-free batches through the model's own loss path (logits at every position, as
without finetune's `causal_lm_loss`); `--vocab 128256` gives the model Llama 3's vocabulary
size, where that projection weighs. Every case runs finetune's fused LoRA forward but the sixth,
which runs the packed per-document batches through peft's forward (`kernels.lora=peft`).
`--profile` then runs torch.profiler over finetune's packed batches (the fourth case) and prints
each kind of op's share of the wall time (median of `--repeats` profiled runs): matrix products,
SDPA, the other ops by name, and what ran outside aten ops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bench_workload as workload
from bench import PRESETS

LAYOUTS = {
    "unpacked, padded rows (sdpa)": ("unpacked",
                                     ["data.padding_free=off", "kernels.attention=sdpa"]),
    "unpacked, padding-free rows (sdpa_varlen)": ("unpacked", ["kernels.attention=sdpa_varlen"]),
    "packed, 4D mask (sdpa)": ("packed", ["kernels.attention=sdpa"]),
    "packed, per document (sdpa_varlen)": ("packed", ["kernels.attention=sdpa_varlen"]),
}
FULL_LOGITS = "unpacked, padding-free rows, logits at every position"
PEFT_FORWARD = "packed, per document, peft's LoRA forward"


def load_model(model_dir: Path, plan: dict, settings: workload.Settings, lora: str = "fused"):
    """The model with LoRA as finetune sets it up (seeded, so every layout gets the same), with
    the `lora` forward (fused | peft)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.kernels import apply_lora_kernel

    torch.manual_seed(settings.seed)
    model = workload.load_side_model(model_dir, plan)
    model = get_peft_model(model, LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    apply_lora_kernel(model, lora)
    return model


def run_layout(model, batches: list[dict], plan: dict, *,
               full_logits: bool = False) -> tuple[float, list[float]]:
    """CPU seconds of forward + backward over `batches`, and each batch's loss: finetune's loss,
    or with `full_logits` the model's own loss path."""
    from contextlib import nullcontext

    import torch

    from finetune.kernels import TORCH_DTYPES
    from finetune.train.loss import causal_lm_loss, trained_tokens

    autocast = (torch.autocast("cpu", dtype=TORCH_DTYPES[plan["precision"]])
                if plan["autocast"] else nullcontext())
    losses = []
    start = time.process_time()
    for batch in batches:
        items = torch.tensor(float(trained_tokens(batch)))
        with autocast:
            loss = (model(**batch, num_items_in_batch=items, use_cache=False).loss if full_logits
                    else causal_lm_loss(model, batch, items))
        loss.backward()
        losses.append(float(loss.detach()))
    seconds = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return seconds, losses


def op_shares(model, batches: list[dict], plan: dict, repeats: int) -> dict[str, float]:
    """Share (%) of the wall time of a forward + backward of `batches` spent in matrix
    products, in SDPA, in each other aten op (self time, on the calling thread) and outside
    aten ops (Python, autograd bookkeeping, the profiler itself): the median over `repeats`
    profiled runs, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run_layout(model, batches, plan)
            wall_us = (time.perf_counter() - start) * 1e6
        shares: dict[str, float] = {}
        for event in prof.key_averages():
            name = event.key
            if not name.startswith("aten::"):
                continue
            if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"):
                name = "matrix products"
            elif "scaled_dot_product" in name:
                name = "SDPA"
            shares[name] = shares.get(name, 0.0) + 100 * event.self_cpu_time_total / wall_us
        shares["outside aten ops"] = max(0.0, 100 - sum(shares.values()))
        runs.append(shares)
    medians = {name: statistics.median(run.get(name, 0.0) for run in runs)
               for name in {name for run in runs for name in run}}
    return dict(sorted(medians.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["smoke", "small", "medium"], default="medium",
                        help="smoke: the small model on short rows (64 tokens, micro-batches "
                             "of 2), for this script's tests")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["plan", "bf16", "fp32"], default="plan")
    parser.add_argument("--vocab", type=int, help="the model's vocabulary size (default: the "
                                                  "tiny tokenizer's 1,888)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile finetune's packed batches: each op's share of time")
    args = parser.parse_args(argv)
    import torch

    from finetune.models.tiny import build_tiny_tokenizer

    settings = replace(PRESETS[args.size], precision=args.precision)
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        work = Path(tmp)
        workload.build_model_folder(settings.size, work / "model", vocab=args.vocab)
        rows = workload.make_rows(settings.rows, settings.max_seq_len,
                                  workload.vocabulary_words(build_tiny_tokenizer()))
        workload.write_jsonl(rows, work / "data.jsonl")
        batches, plans, models = {}, {}, {}
        for name, (mode, extra) in LAYOUTS.items():
            overrides = workload.ours_overrides(
                settings, model_dir=work / "model", data_path=work / "data.jsonl",
                packing=mode == "packed", cache_dir=work / "cache") + extra
            plans[name], _ = workload.dump_batches(overrides, args.steps, work / name)
            batches[name] = [torch.load(p, weights_only=True)
                             for p in sorted((work / name).glob("*.pt"))]
            models[name] = load_model(work / "model", plans[name], settings)
        free, per_document = list(LAYOUTS)[1], list(LAYOUTS)[3]
        batches[FULL_LOGITS], plans[FULL_LOGITS] = batches[free], plans[free]
        models[FULL_LOGITS] = models[free]
        batches[PEFT_FORWARD], plans[PEFT_FORWARD] = batches[per_document], plans[per_document]
        models[PEFT_FORWARD] = load_model(work / "model", plans[per_document], settings, "peft")
        names = [*LAYOUTS, FULL_LOGITS, PEFT_FORWARD]
        for name in names:  # warm-up: one batch each
            run_layout(models[name], batches[name][:1], plans[name],
                       full_logits=name == FULL_LOGITS)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        losses: dict[str, list[float]] = {}
        for rep in range(args.repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                spent, found = run_layout(models[name], batches[name], plans[name],
                                          full_logits=name == FULL_LOGITS)
                seconds[name].append(spent)
                losses[name] = found
        shares = (op_shares(models[per_document], batches[per_document], plans[per_document],
                            args.repeats) if args.profile else None)
    medians = {name: statistics.median(found) for name, found in seconds.items()}
    tokens = {name: sum(int((b["labels"] != -100).sum()) for b in batches[name])
              for name in names}
    for name in names:
        print(f"{name}: {medians[name]:.2f} CPU-s for {args.steps} micro-batches "
              f"(runs {', '.join(f'{s:.2f}' for s in seconds[name])})", flush=True)
    ratios = {}
    for slow, fast in ((names[0], names[1]), (names[2], names[3]), (names[4], names[1]),
                       (names[5], names[3])):
        ratios[f"{slow} / {fast}"] = medians[slow] / medians[fast]
        diff = max(abs(a - b) for a, b in zip(losses[slow], losses[fast], strict=True))
        print(f"{slow} / {fast}: {medians[slow] / medians[fast]:.3f}; largest per-batch loss "
              f"difference {diff:.2e}", flush=True)
    if shares is not None:
        top = [f"{name} {share:.1f}%" for name, share in shares.items() if share >= 0.5]
        print(f"{per_document}, share of the wall time: {', '.join(top)}", flush=True)
    print(json.dumps({"size": settings.size, "vocab": args.vocab or 1888,
                      "precision": plans[names[0]]["precision"],
                      "cpu_s": medians, "ratios": ratios, "trained_tokens": tokens,
                      **({"op_shares": shares} if shares is not None else {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
