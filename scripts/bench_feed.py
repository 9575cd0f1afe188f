"""How long the loop waits for its batches, with the batch feed off (trainer.prefetch=0) and on.

    python scripts/bench_feed.py [--repeats 3] [--steps 40] [OVERRIDES...]

Runs `finetune run lora_sft` A/B/A/B (feed off, feed on) in fresh processes on the same model,
data and settings, and prints per variant the median over runs of the per-step median
`data_wait_s`, the median tokens/s, and the ratios on/off. Extra arguments are Hydra overrides
for both variants (e.g. data.packing=true data.max_seq_len=512 to make batches costlier to build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"feed off": "trainer.prefetch=0", "feed on": "trainer.prefetch=4"}


def run_once(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(median data_wait_s per step, median tokens/s) of one run, warm-up step left out."""
    command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft", *overrides,
               f"output_dir={run_dir}"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [r for r in map(json.loads, lines) if "loss" in r][1:]
    return (statistics.median(r["data_wait_s"] for r in steps),
            statistics.median(r["tokens_per_s"] for r in steps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args, overrides = parser.parse_known_args()
    common = [f"trainer.max_steps={args.steps}", "trainer.eval_every_n_steps=0",
              "trainer.save_every_n_steps=0", *overrides]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, setting in VARIANTS.items():  # A/B/A/B
                run_dir = Path(tmp) / f"{name.replace(' ', '_')}-{repeat}"
                results[name].append(run_once([*common, setting], run_dir))
    summary = {}
    for name, runs in results.items():
        wait = statistics.median(w for w, _ in runs)
        speed = statistics.median(s for _, s in runs)
        summary[name] = {"data_wait_ms": round(wait * 1e3, 3), "tokens_per_s": round(speed, 1)}
        print(f"{name:9}: data_wait_s median {wait * 1e3:.3f} ms/step, {speed:,.0f} tokens/s "
              f"({len(runs)} runs)")
    off, on = summary["feed off"], summary["feed on"]
    ratio = on["tokens_per_s"] / off["tokens_per_s"]
    print(f"feed on / off: tokens/s x{ratio:.3f}; wait {on['data_wait_ms']:.3f} vs "
          f"{off['data_wait_ms']:.3f} ms/step")
    print(json.dumps({**summary, "speed_ratio_on_off": round(ratio, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
