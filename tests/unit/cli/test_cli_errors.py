"""Bad input on the command line: one clear paragraph and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._cli import run_cli


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "lora_sft", "optim.lrr=1"], "Did you mean 'optim.lr'"),
    (["run", "lora_sft", "trainer.max_steps=abc"], "trainer.max_steps"),
    (["run", "lora_sftt"], "Recipes: full_sft, lora_sft"),
    (["run", "lora_sft", "model.name_or_path=/no/such/model"], "no such model folder"),
    (["run", "lora_sft", "data.path=/no/such/data.jsonl"], "/no/such/data.jsonl"),
    (["run", "lora_sft", "kernels.attention=flash_attention_2"], "flash_attention_2"),
    (["frobnicate"], "unknown command"),
    (["run"], "needs a recipe"),
])
def test_bad_input_exits_2(args: list[str], expected: str, tmp_path: Path) -> None:
    if args[0] == "run" and len(args) > 1:
        args = [*args, f"output_dir={tmp_path / 'run'}"]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_output_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = run_cli("run", "lora_sft", f"output_dir={target}")
    assert result.returncode == 2
    assert "is a file" in result.stderr
    assert target.read_text() == "keep me"


def test_existing_run_dir_is_not_touched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    result = run_cli("run", "lora_sft", f"output_dir={run_dir}")
    assert result.returncode == 2
    assert "resume=auto" in result.stderr
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_help_ls_cp_validate(tmp_path: Path) -> None:
    assert run_cli("--help").returncode == 0
    listing = run_cli("ls")
    assert listing.returncode == 0 and "lora_sft" in listing.stdout and "peft/" in listing.stdout
    copied = run_cli("cp", "lora_sft", str(tmp_path / "mine.yaml"))
    assert copied.returncode == 0, copied.stderr
    text = (tmp_path / "mine.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text + "trainer:\n  max_steps: 7\n")
    validated = run_cli("validate", str(tmp_path / "mine.yaml"), "peft.r=4")
    assert validated.returncode == 0, validated.stderr
    assert "max_steps: 7" in validated.stdout and "r: 4" in validated.stdout
    ran = run_cli("run", str(tmp_path / "mine.yaml"), "trainer.max_steps=1",
                  "data.max_seq_len=32", "trainer.micro_batch_size=2",
                  "trainer.eval_max_batches=1", f"output_dir={tmp_path / 'run'}")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "run/final/adapter_model.safetensors").is_file()
    again = run_cli("cp", "lora_sft", str(tmp_path / "mine.yaml"))
    assert again.returncode == 2 and "already exists" in again.stderr
