"""One side of scripts/bench.py: the `finetune` command itself, with a clock on its steps.

    python scripts/bench_ours.py CLOCK_JSON run lora_sft OVERRIDES...

Runs `finetune.cli.main` (what the `finetune` console script runs) with the given arguments in
this process. The one addition: each time a step's record is written to metrics.jsonl (at the
end of that optimizer step, after zero_grad), the wall clock is read. CLOCK_JSON then holds
`step_ends` (time.perf_counter per step), `step_cpu` (time.process_time per step) and
`first_step_end_unix` (time.time at the end of
step 1), which bench.py turns into tokens/s and the time from process start to the first step.
Everything else (losses, token counts) is read from the run's own metrics.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    clock_path, cli_args = Path(argv[0]), argv[1:]
    from finetune.cli import main as finetune_main
    from finetune.metrics.writers import MetricsFile

    step_ends: list[float] = []
    step_cpu: list[float] = []
    first_unix: list[float] = []
    write = MetricsFile.write

    def timed_write(self: MetricsFile, record: dict) -> None:
        write(self, record)
        if "loss" in record:
            step_ends.append(time.perf_counter())
            step_cpu.append(time.process_time())
            if not first_unix:
                first_unix.append(time.time())

    MetricsFile.write = timed_write  # type: ignore[method-assign]
    code = finetune_main(cli_args)
    clock_path.write_text(json.dumps({
        "step_ends": step_ends, "step_cpu": step_cpu,
        "first_step_end_unix": first_unix[0] if first_unix else None}), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
