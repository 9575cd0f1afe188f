"""Benchmark the data pipeline with the tiny tokenizer (not a test; prints figures).

    PYTHONPATH=. .venv/bin/python scripts/bench_data.py [--rows 20000] [--cached-rows 100000]
        [--stream-rows 10000,1000000] [--repeats 3]

1. Throughput: alpaca rows -> template -> tokens -> labels -> packed rows (build_data with an
   empty cache), in rows/s; median of --repeats runs, next to the same build in one process
   (data.num_proc=1) and to the bare tokenizer's batch encode of the same rendered texts.
2. Cached re-run: build_data again over --cached-rows rows once the cache is warm.
3. Streaming memory: peak RSS of a fresh process that streams one full epoch (packed) of N
   rows, for each N in --stream-rows; flat memory means the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.config.data import DataConfig  # noqa: E402
from finetune.data import build_data  # noqa: E402
from finetune.data.sources import BUNDLED_DIR  # noqa: E402


def write_rows(path: Path, n: int) -> Path:
    """n distinct alpaca rows made from the bundled ones (a row number keeps them distinct)."""
    base = [json.loads(line) for line in (BUNDLED_DIR / "instructions.jsonl").open()]
    with path.open("w") as f:
        for i in range(n):
            row = dict(base[i % len(base)])
            row["instruction"] = f"{row['instruction']} (#{i})"
            f.write(json.dumps(row) + "\n")
    return path


@functools.cache
def tiny_tokenizer():
    """Loaded once: loading a tokenizer is not part of what the data pipeline is timed on."""
    from finetune.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def build(path: Path, cache: Path, **kwargs):
    cfg = DataConfig(path=str(path), format="alpaca", packing=True, max_seq_len=512,
                     cache_dir=str(cache), val_split=0.0, **kwargs)
    return build_data(cfg, tiny_tokenizer(), attention="sdpa", seed=0, micro_batch_size=8)


def bare_tokenizer_seconds(path: Path, offsets: bool) -> float:
    """Time the tokenizer alone on the rendered texts (1024-row batches, no special tokens),
    with offset tracking (`encode_batch`) or without (`encode_batch_fast`, what the pipeline
    calls for tokenizers whose tokens spell the text: finetune/data/encode/token_bytes.py)."""
    from finetune.data.encode.layout import LayoutRenderer
    from finetune.data.formats import converter_for
    from finetune.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    renderer = LayoutRenderer(tokenizer, tokenizer.chat_template)
    convert = converter_for("alpaca", {})
    texts = [renderer.render(convert(json.loads(line))).text for line in path.open()]
    backend = tokenizer.backend_tokenizer
    encode = backend.encode_batch if offsets else backend.encode_batch_fast
    started = time.perf_counter()
    for i in range(0, len(texts), 1024):
        encode(texts[i:i + 1024], add_special_tokens=False)
    return time.perf_counter() - started


def peak_rss_mib() -> float:
    """This process's own peak RSS. On Linux, VmHWM: getrusage's ru_maxrss survives exec, so a
    child started from this (large) benchmark process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def stream_child(path: str, rows: int) -> None:
    """Run in a fresh process: stream one packed epoch, print peak RSS (MiB) as JSON."""
    data = build(Path(path), Path(tempfile.mkdtemp()), streaming=True)
    step = 8
    started = time.perf_counter()
    batches = 0
    for _ in data.train:
        batches += 1
        if data.train.epoch >= 1:
            break
    seconds = time.perf_counter() - started
    rss = peak_rss_mib()
    print(json.dumps({"rows": rows, "peak_rss_mib": rss, "seconds": seconds,
                      "packed_rows": batches * step, "read": data.stats.rows_read}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--cached-rows", type=int, default=100000)
    parser.add_argument("--stream-rows", default="10000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        stream_child(args.stream_child[0], int(args.stream_child[1]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    import torch

    print(f"torch threads {torch.get_num_threads()}, tiny tokenizer, alpaca rows, packing to 512")

    path = write_rows(work / "rows.jsonl", args.rows)
    times, one_process = [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine
        started = time.perf_counter()
        data = build(path, work / f"cold-{r}")
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        build(path, work / f"cold-one-{r}", num_proc=1)
        one_process.append(time.perf_counter() - started)
    bare = statistics.median(bare_tokenizer_seconds(path, False) for _ in range(args.repeats))
    tracked = statistics.median(bare_tokenizer_seconds(path, True) for _ in range(args.repeats))
    cold, single = statistics.median(times), statistics.median(one_process)
    stats = data.stats
    print(f"1. throughput: {args.rows / cold:,.0f} rows/s (median of {args.repeats}: "
          f"{cold:.2f} s for {args.rows:,} rows; {stats.tokens:,} tokens, "
          f"{stats.packed_sequences:,} packed rows, {stats.packing_efficiency:.1%} full)")
    print(f"   one process (data.num_proc=1, tokenizer threads): {args.rows / single:,.0f} rows/s;"
          f" bare tokenizer batch encode alone (both cores): {args.rows / bare:,.0f} rows/s"
          f" ({args.rows / tracked:,.0f} rows/s with offsets)")
    print(f"   ratios: pipeline / one process time = {cold / single:.2f}; pipeline / tokenizer "
          f"time = {cold / bare:.2f}; target 20,000 rows/s -> {args.rows / cold / 20000:.2f} "
          "of target")

    big = write_rows(work / "cached.jsonl", args.cached_rows)
    started = time.perf_counter()
    build(big, work / "warm")
    first = time.perf_counter() - started
    cached = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        build(big, work / "warm")
        cached.append(time.perf_counter() - started)
    warm = statistics.median(cached)
    print(f"2. cached re-run of {args.cached_rows:,} rows: {warm:.2f} s (median of "
          f"{args.repeats}; first build {first:.1f} s; ratio {first / warm:.0f}x; target < 2 s)")

    results = []
    for n in [int(x) for x in args.stream_rows.split(",")]:
        file = write_rows(work / f"stream-{n}.jsonl", n)
        out = subprocess.run([sys.executable, __file__, "--stream-child", str(file), str(n)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        file.unlink()
    for r in results:
        print(f"3. streaming {r['rows']:,} rows (one packed epoch, {r['seconds']:.0f} s): "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    if len(results) > 1:
        print(f"   peak RSS ratio {results[-1]['rows']:,} / {results[0]['rows']:,} rows: "
              f"{results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
