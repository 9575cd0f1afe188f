"""`finetune data inspect`: the report core, and the command on a shipped recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.commands.data_inspect import JSON_KEYS, inspect_data, main, mark_trained
from finetune.config.data import DataConfig


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_mark_trained_wraps_each_trained_run(tokenizer):
    ids = np.array(tokenizer("ab cd ef", add_special_tokens=False)["input_ids"])
    trained = np.zeros(len(ids), dtype=bool)
    trained[-1] = True
    text = mark_trained(tokenizer, ids, trained)
    assert text.endswith("[[" + tokenizer.decode(ids[-1:].tolist()) + "]]")
    assert text.replace("[[", "").replace("]]", "") == "ab cd ef"


def test_report_counts_and_shows_the_masked_example(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"It is {i}."} for i in range(10)]
    rows.append({"instruction": "no output"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), packing=True, max_seq_len=64, val_split=0.0,
                     on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
    report, text = inspect_data(cfg, tokenizer, attention="auto")
    assert set(JSON_KEYS) <= set(report)
    assert (report["format"], report["rows"], report["skipped_rows"]) == ("alpaca", 10, 1)
    assert report["isolation"] == "block_mask_4d"  # auto is taken as sdpa
    assert 0 < report["packing_efficiency"] <= 1
    assert "[[It is 0.<|end|>]]" in text and "<|user|>\nSay 0." in text
    assert "skipped rows:       1 (missing_field: 1)" in text
    assert "packed sequences:" in text


def test_command_prints_json_for_a_recipe(capsys):
    code = main(["lora_sft", "--json", "data.max_seq_len=30", "data.truncation=drop"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert set(JSON_KEYS) <= set(report)
    assert report["format"] == "alpaca" and report["dropped_rows"] > 0


def test_command_bad_data_path_exits_2_with_the_fix(capsys):
    code = main(["lora_sft", "data.path=/nonexistent/train.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data file not found: /nonexistent/train.jsonl" in err and "data.path" in err


@pytest.mark.parametrize(("override", "padding_free"), [([], True),
                                                        (["kernels.attention=sdpa"], False)])
def test_command_shows_the_layout_the_run_would_train_on(capsys, monkeypatch, override,
                                                         padding_free):
    """auto is resolved as a run resolves it: on a CPU the plan's sdpa_varlen, whose unpacked
    micro-batches are padding-free rows."""
    import finetune.hardware as hardware
    from finetune.hardware import profile_by_name

    monkeypatch.setattr(hardware, "detect", lambda: profile_by_name("cpu"))
    assert main(["lora_sft", *override]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("packing:"))
    assert ("padding-free rows" in line) is padding_free
