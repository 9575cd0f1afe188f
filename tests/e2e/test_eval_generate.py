"""`finetune eval`, `finetune generate` and `finetune merge` on what runs leave behind, as a user
runs them: a LoRA run, its merged folder, a full fine-tune, a QLoRA run (where bitsandbytes
runs), and folders that are not models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests._cli import QUICK, run_cli

SAMPLED = ["--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=10", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def eval_json(*args: str) -> dict:
    result = run_cli("eval", *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_eval_of_a_run_its_merged_folder_and_the_base(lora_run: Path, tmp_path: Path) -> None:
    held_out = eval_json(str(lora_run))
    assert held_out["kind"] == "run" and held_out["rows"] > 0
    assert held_out["data"].startswith("the run's held-out rows")
    merged = tmp_path / "merged"
    result = run_cli("merge", str(lora_run), str(merged))
    assert result.returncode == 0, result.stderr[-2000:]
    data = "data.path=builtin:instructions"
    from_run = eval_json(str(lora_run), data, "--max-batches", "3")
    from_merged = eval_json(str(merged), data, "--max-batches", "3")
    from_base = eval_json("tiny", data, "--max-batches", "3")
    assert from_run["trained_tokens"] == from_merged["trained_tokens"] > 0
    assert from_merged["loss"] == pytest.approx(from_run["loss"], rel=1e-4)
    assert from_run["loss"] < from_base["loss"]  # the run learned the bundled data


def test_generate_from_a_run_is_repeatable_under_a_seed(lora_run: Path, tmp_path: Path) -> None:
    first = run_cli("generate", str(lora_run), "--prompt", "Write the number in words.\n\n7",
                    *SAMPLED)
    again = run_cli("generate", str(lora_run), "--prompt", "Write the number in words.\n\n7",
                    *SAMPLED)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() and first.stdout == again.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Give the opposite of the word.\\n\\nhot"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("generate", str(lora_run), "--prompts", str(prompts), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"].endswith("hot") and isinstance(record["completion"], str)


def test_folders_that_are_not_models_and_runs_without_adapters(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["generate", str(empty), "--prompt", "x"],
                 ["eval", str(empty), "data.path=builtin:instructions"]):
        result = run_cli(*args)
        assert result.returncode == 2 and "is not a model" in result.stderr, result.stderr
    full = tmp_path / "full"
    result = run_cli("run", "full_sft", *QUICK, "trainer.max_steps=2", f"output_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    merged = run_cli("merge", str(full), str(tmp_path / "merged"))
    assert merged.returncode == 2 and "has no adapter to merge" in merged.stderr


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed")
def test_qlora_run_merges_in_16_bit_and_its_adapter_loads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "qlora"
    result = run_cli("run", "lora_sft", "peft=qlora", *QUICK, "trainer.max_steps=3",
                     f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4-bit NF4" in result.stderr
    adapter = json.loads((run_dir / "final/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    PeftModel.from_pretrained(base, str(run_dir / "final"))  # plain peft, no bitsandbytes
    merged = run_cli("merge", str(run_dir), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "QLoRA run" in merged.stderr and "merged into the base loaded in" in merged.stderr
