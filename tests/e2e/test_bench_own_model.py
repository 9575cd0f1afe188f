"""scripts/bench.py on a model folder and a data file of the user's (`--model`, `--data`): every
side trains that model on those rows, the JSON line is the usual one, and the figures go to the
doc named, never into this repository's docs/benchmarks.md. TRL's sides run where TRL is
installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = REPO / "scripts"
ROWS = [{"instruction": f"Write the number {n} in words.", "output": f"The number {n}."}
        for n in range(40)]


@pytest.mark.slow
def test_bench_on_your_model_and_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_report
    finally:
        sys.path.remove(str(SCRIPTS))
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    doc, kept = tmp_path / "my-bench.md", tmp_path / "kept"
    repo_doc = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    with_trl = importlib.util.find_spec("trl") is not None
    sides = "ours:packed,reference:packed" + (",trl:packed" if with_trl else "")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--smoke", "--repeats", "1",
         "--model", str(tiny_model_dir), "--data", str(data), "--sides", sides,
         "--doc", str(doc), "--keep", str(kept)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert tuple(line) == bench_report.JSON_KEYS
    assert line["ours_packed_tokens_per_s"] > 0 and line["reference_tokens_per_s"] > 0
    assert (line["trl_packed_tokens_per_s"] or 0) > 0 if with_trl else (
        line["trl_packed_tokens_per_s"] is None)
    # Every side trained the given model on the given rows.
    assert (kept / "model").resolve() == tiny_model_dir.resolve()
    rows = [json.loads(r) for r in (kept / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == [r["instruction"] for r in ROWS]
    config = next(kept.glob("runs/ours-packed-0/run/config.yaml")).read_text(encoding="utf-8")
    assert str(kept / "model") in config and str(kept / "data.jsonl") in config
    written = doc.read_text(encoding="utf-8")
    assert f"### smoke: {tiny_model_dir.name}" in written and "40 rows of mine.jsonl" in written
    assert (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8") == repo_doc


def test_a_data_file_that_cannot_be_benchmarked_exits_2(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    data = tmp_path / "documents.jsonl"
    data.write_text('{"text": "a plain document"}\n', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench.py"), "--smoke", "--no-trl", "--model",
         str(tiny_model_dir), "--data", str(data)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: --data {data}: plain text documents" in done.stderr
    assert "Traceback" not in done.stderr
