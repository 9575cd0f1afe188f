"""Benchmark: restoring the data position at step 10,000 costs the same as at step 10.

Builds (or loads from the tokenized cache) an alpaca dataset of --rows rows, then times
`load_state_dict` + the first batch at a position of 10 steps and of 10,000 steps, and prints
the medians and their ratio. Resume never replays batches, so the ratio should be ~1.

    python scripts/bench_resume.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.models.tiny import build_tiny_tokenizer


def write_rows(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Add {i % 97} and {i % 89}.", "input": "",
                                "output": f"{i % 97} + {i % 89} = {i % 97 + i % 89}."}) + "\n")


def time_resume(bundle, position: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        state = dict(bundle.train.state_dict(), position=position)
        start = time.perf_counter()
        bundle.train.load_state_dict(state)
        next(iter(bundle.train))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "train.jsonl"
        write_rows(data_file, args.rows)
        cfg = DataConfig(path=str(data_file), format="alpaca", max_seq_len=64,
                         cache_dir=str(Path(tmp) / "cache"))
        start = time.perf_counter()
        bundle = build_data(cfg, build_tiny_tokenizer(), attention="sdpa", seed=0,
                            micro_batch_size=args.micro_batch_size)
        print(f"built {args.rows} rows in {time.perf_counter() - start:.1f} s")
        early = time_resume(bundle, 10 * args.micro_batch_size, args.repeats)
        late = time_resume(bundle, 10_000 * args.micro_batch_size, args.repeats)
    print(f"resume at step 10:     median {early * 1e3:.2f} ms")
    print(f"resume at step 10,000: median {late * 1e3:.2f} ms")
    print(f"ratio (10,000 / 10): {late / early:.2f}")


if __name__ == "__main__":
    main()
