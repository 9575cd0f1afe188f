"""Data a run would learn nothing true from is refused before any work, and the truncation
report counts each row once, the same in `data inspect` and in a run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests._cli import QUICK, run_cli


def _left_as_found(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dpo_pairs_with_the_same_answers_are_refused(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "Yes."} for i in range(8)]
    data = _write(tmp_path / "pairs.jsonl", rows)
    run_dir = tmp_path / "run"
    result = run_cli("run", "dpo", f"data.path={data}", "trainer.max_steps=2",
                     f"output_dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "gradient of exactly 0" in result.stderr and f"{data}:1" in result.stderr
    assert "Traceback" not in result.stderr
    assert _left_as_found(run_dir)


def test_held_out_data_that_is_training_data_is_refused(tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(20)]
    data = _write(tmp_path / "train.jsonl", rows)
    os.symlink(data, tmp_path / "val.jsonl")
    result = run_cli("data", "inspect", "lora_sft", f"data.path={data}",
                     f"data.val_path={tmp_path}/val.jsonl", *QUICK)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.val_path=" in result.stderr and "data.path=" in result.stderr
    assert "data.val_split" in result.stderr and "Traceback" not in result.stderr


def test_a_length_past_the_model_context_is_refused() -> None:
    result = run_cli("data", "inspect", "lora_sft", "data.max_seq_len=4096")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.max_seq_len=4096" in result.stderr and "(2048 tokens" in result.stderr


@pytest.fixture(scope="module")
def cut_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows whose prompt fills 48 tokens (dropped there), rows with a long answer (truncated),
    and rows that fit."""
    rows = []
    for i in range(60):
        if i % 3 == 0:
            rows.append({"instruction": "Tell a long story. " + "word " * 40, "output": f"{i}."})
        elif i % 3 == 1:
            rows.append({"instruction": f"Count {i}.", "output": " ".join(map(str, range(40)))})
        else:
            rows.append({"instruction": f"Say {i}.", "output": f"{i}."})
    return _write(tmp_path_factory.mktemp("cut") / "rows.jsonl", rows)


def test_inspect_and_run_count_each_row_once_alike(cut_data: Path, tmp_path: Path) -> None:
    args = [f"data.path={cut_data}", "data.format=alpaca", "data.max_seq_len=48",
            "data.val_split=0"]
    inspect = run_cli("data", "inspect", "lora_sft", *args, "--json")
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    report = json.loads(inspect.stdout)
    counted = report["truncated_rows"] + report["dropped_rows"] + report["skipped_rows"]
    assert counted <= report["rows_read"] == 60
    assert (report["truncated_rows"], report["dropped_rows"]) == (20, 20)
    match = re.search(r"(\d+) of (\d+) rows \(([\d.]+)%\)", inspect.stderr)
    assert match and (int(match[1]), int(match[2])) == (40, 60) and float(match[3]) <= 100
    run_dir = tmp_path / "run"
    run = run_cli("run", "lora_sft", *args, "trainer.max_steps=2", "trainer.micro_batch_size=4",
                  "trainer.eval_every_n_steps=0", "trainer.save_every_n_steps=0",
                  f"output_dir={run_dir}")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["truncated_rows"], summary["dropped_rows"]) == (20, 20)
    assert "20 truncated, 20 dropped, 0 skipped of 60 read" in run.stdout
