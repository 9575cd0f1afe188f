"""Traps a new user fell into by following the README: settings of the bundled data that
followed their own data.path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._cli import QUICK, run_cli


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("own-data")
    chat = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(40)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    # Alpaca rows far longer than the bundled data's (which all fit in 128 tokens).
    long = [{"instruction": f"Summarise note {i}.",
             "output": " ".join(f"point {j} of note {i} is fine." for j in range(12 + i % 5))}
            for i in range(60)]
    (folder / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
    return folder


def test_own_chat_data_with_only_data_path_trains(own_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", f"data.path={own_data / 'chat.jsonl'}", *QUICK,
                     f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["format"] == "chat"


def test_own_long_data_is_not_cut_to_the_bundled_length(own_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", f"data.path={own_data / 'long.jsonl'}", *QUICK[:1],
                     "trainer.max_steps=2", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    assert data["max_seq_len"] > 128 and data["max_seq_len_from"].startswith("auto")
    assert data["truncated_rows"] + data["dropped_rows"] <= 0.01 * data["rows_read"]
    assert "0 truncated, 0 dropped, 0 skipped of 60 read" in result.stdout


def test_cutting_many_rows_warns_with_counts_and_the_key(own_data: Path) -> None:
    result = run_cli("data", "inspect", "lora_sft", f"data.path={own_data / 'long.jsonl'}",
                     "data.max_seq_len=64")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows (" in result.stderr and "do not fit data.max_seq_len=64" in result.stderr
    assert "set data.max_seq_len=auto" in result.stderr


def test_data_inspect_shows_the_length_in_force_and_its_origin(own_data: Path) -> None:
    auto = run_cli("data", "inspect", "lora_sft", f"data.path={own_data / 'long.jsonl'}")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "max_seq_len:" in auto.stdout and "(auto: 99% of rows fit" in auto.stdout
    fixed = run_cli("data", "inspect", "lora_sft", "data.max_seq_len=256")
    assert "max_seq_len:        256 (data.max_seq_len)" in fixed.stdout


def test_wrong_format_error_names_the_format_that_reads_the_row(own_data: Path) -> None:
    result = run_cli("data", "inspect", "lora_sft", f"data.path={own_data / 'chat.jsonl'}",
                     "data.format=alpaca")
    assert result.returncode == 2
    assert "data.format=chat" in result.stderr and "data.format=auto" in result.stderr
