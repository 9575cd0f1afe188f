"""Check the memory estimate against the peak a run measures, on the CPU.

    python scripts/check_memory_estimate.py                    # a 135M model, 5 runs
    python scripts/check_memory_estimate.py --model tiny --steps 2

Each configuration is a real `finetune run` in its own process: the default run (`lora_sft`),
`lora_sft data.packing=true`, `full_sft`, `dpo` and `lora_sft peft=qlora`, on the bundled data
with `data.max_seq_len=auto`. `--model 135m` (the default) is a random-weight Llama of the shape
of a 135M chat model (SmolLM-135M's config.json: hidden 576, 30 layers, 9 query and 3 KV heads,
a 49,152-token vocabulary, tied embeddings) with the built-in tokenizer; `--model tiny` is the
built-in tiny model; a folder is used as it is.

What is compared, per run:

- estimate: the total the run printed (`distributed: ...` line), re-made once the data has
  chosen its row length. On the CPU its overhead is the process's resident memory when the
  estimate was made, before the model loads (Python, torch and the libraries).
- measured: the process's peak resident set size at the end of the run (ru_maxrss), what the
  run reports as `peak_memory_gb` in summary.json on the CPU.
- training increment: estimate minus its overhead, against the measured peak minus the
  process's resident memory when setup started (before the model loads): what the model,
  optimizer, activations and data add, without the fixed cost of the process.

Prints one line per run and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
TARGET = 0.30  # the estimate within ±30% of the measured peak
CHILD_OUT = "CHECK_MEMORY_ESTIMATE_OUT"

# name -> (recipe, overrides)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "default (lora_sft)": ("lora_sft", []),
    "lora_sft packing": ("lora_sft", ["data.packing=true"]),
    "full_sft": ("full_sft", []),
    "dpo": ("dpo", []),
    "lora_sft peft=qlora": ("lora_sft", ["peft=qlora"]),
}
# SmolLM-135M's config.json (huggingface.co/HuggingFaceTB/SmolLM-135M).
SHAPE_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                  tie_word_embeddings=True, max_position_embeddings=2048)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="135m",
                        help="135m (a random 135M-parameter Llama, default), tiny, or a folder")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps a run")
    parser.add_argument("--only", action="append", choices=list(CONFIGS),
                        help="run only this configuration (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("finetune_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_135m(dest: Path) -> Path:
    """A random-weight Llama of SHAPE_135M, in fp32, with the built-in tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from finetune.models.tiny import build_tiny_tokenizer, tiny_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    for key, value in SHAPE_135M.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(finetune_args: list[str]) -> int:
    """Run `finetune` in this process, recording the estimate the run printed, the resident
    memory when setup started and the peak at the end, into $CHECK_MEMORY_ESTIMATE_OUT."""
    import finetune.train.run as run
    from finetune.cli import main

    record: dict[str, Any] = {}
    setup = run.setup

    def setup_recorded(*args: Any, **kwargs: Any) -> Any:
        record["baseline"] = resident_bytes()
        parts = setup(*args, **kwargs)
        # The strategy re-made with the data's row length: the estimate the run printed.
        record["estimate"] = parts.strategy.estimate.to_dict()
        record["strategy"] = str(parts.strategy.strategy)
        return parts

    run.setup = setup_recorded
    code = main(finetune_args)
    record["peak"] = peak_resident_bytes()
    Path(os.environ[CHILD_OUT]).write_text(json.dumps(record))
    return code


def run_config(name: str, recipe: str, overrides: list[str], *, model: str, steps: int,
               work: Path) -> dict[str, Any]:
    out = work / f"{list(CONFIGS).index(name)}.json"
    # The evaluation at the end is a forward pass only (less memory than a step): one batch.
    args = ["run", recipe, f"model.name_or_path={model}", *overrides,
            f"trainer.max_steps={steps}", "trainer.eval_every_n_steps=0",
            "trainer.eval_max_batches=1", "trainer.save_every_n_steps=0",
            f"output_dir={out.with_suffix('')}"]
    proc = subprocess.run([sys.executable, __file__, "--child", "--", *args], cwd=ROOT,
                          env={**os.environ, CHILD_OUT: str(out)}, capture_output=True,
                          text=True)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{name}: finetune {' '.join(args)} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    record = json.loads(out.read_text())
    est = record["estimate"]
    total, overhead = est["bytes"]["total"], est["bytes"]["overhead"]
    peak, baseline = record["peak"], record["baseline"]
    return {"config": name, "strategy": record["strategy"], "rows": est["rows"],
            "seq_len": est["seq_len"], "estimate_gib": round(total / GIB, 3),
            "measured_gib": round(peak / GIB, 3), "ratio": round(total / peak, 3),
            "overhead_gib": round(overhead / GIB, 3), "baseline_gib": round(baseline / GIB, 3),
            "increment_estimate_gib": round((total - overhead) / GIB, 3),
            "increment_measured_gib": round((peak - baseline) / GIB, 3),
            "increment_ratio": round((total - overhead) / max(peak - baseline, 1), 3),
            "parts_gib": {k: round(v / GIB, 3) for k, v in est["bytes"].items()}}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.finetune_args)
    import torch

    names = args.only or list(CONFIGS)
    results = []
    with tempfile.TemporaryDirectory(prefix="check-memory-") as tmp:
        work = Path(tmp) / "runs"
        work.mkdir()
        model = args.model
        if model == "135m":
            model = str(build_135m(Path(tmp) / "model-135m"))
        print(f"{'configuration':<22}{'rows x len':>12}{'estimate':>10}{'measured':>10}"
              f"{'ratio':>7}{'  | training increment: est':>28}{'meas':>7}{'ratio':>7}")
        for name in names:
            recipe, overrides = CONFIGS[name]
            r = run_config(name, recipe, overrides, model=model, steps=args.steps, work=work)
            results.append(r)
            print(f"{name:<22}{r['rows']:>6} x {r['seq_len']:<4}{r['estimate_gib']:>8.2f}G"
                  f"{r['measured_gib']:>9.2f}G{r['ratio']:>7.2f}"
                  f"{r['increment_estimate_gib']:>26.2f}G{r['increment_measured_gib']:>6.2f}G"
                  f"{r['increment_ratio']:>7.2f}", flush=True)
    outside = [r["config"] for r in results if abs(r["ratio"] - 1) > TARGET]
    print(json.dumps({"model": args.model, "steps": args.steps, "torch": torch.__version__,
                      "machine": platform.machine(), "target": f"±{TARGET:.0%}",
                      "outside_target": outside, "results": results}))
    return 1 if outside else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
