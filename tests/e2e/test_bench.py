"""scripts/bench.py end to end on its smoke preset: finetune (the real CLI), the reference loop
and TRL each run in their own process, and the last stdout line is the JSON summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = REPO / "scripts"


@pytest.mark.slow
def test_bench_smoke_prints_the_json_line_last(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_report
    finally:
        sys.path.remove(str(SCRIPTS))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--smoke", "--repeats", "1",
         "--sides", "ours:packed,reference:packed,trl:packed", "--doc", str(doc)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    line = json.loads(lines[-1])
    assert tuple(line) == bench_report.JSON_KEYS
    for key in ("ours_packed_tokens_per_s", "reference_tokens_per_s", "trl_packed_tokens_per_s",
                "overhead_vs_reference", "speedup_vs_trl_packed"):
        assert line[key] > 0, key
    assert line["ours_tokens_per_s"] is None  # the unpacked side did not run
    assert any(text.startswith("PASS ") or text.startswith("MISS ") for text in lines)
    written = doc.read_text(encoding="utf-8")
    assert written.startswith("# Benchmarks\n\nhand-written intro")
    assert "<!-- bench:smoke-" in written and "TRL SFTTrainer, packing=True" in written
