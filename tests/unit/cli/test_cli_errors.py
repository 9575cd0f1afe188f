"""Bad input on the command line: one clear paragraph and exit code 2, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune.config.compose import recipe_names, shipped_config_dir

Cli = Callable[..., Any]  # conftest.cli: (*args) -> (code, out, err)


@pytest.mark.parametrize(("args", "expected"), [
    (["run", "lora_sft", "optim.lrr=1"], "Did you mean 'optim.lr'"),
    (["run", "lora_sft", "trainer.max_steps=abc"], "trainer.max_steps"),
    (["run", "lora_sftt"], "unknown recipe 'lora_sftt'. Did you mean 'lora_sft'?"),
    (["run", "lora_sft", "peft.method=lorra"], "peft.method=lorra is not valid. Use one of: "),
    (["run", "lora_sft", "model.name_or_path=/no/such/model"], "no such model folder"),
    (["run", "lora_sft", "kernels.attention=flash_attention_2"], "flash_attention_2"),
    (["run", "lora_sft", "--nproc", "0"], "argument --nproc: 0: give a whole number"),
    (["run", "lora_sft", "--nproc", "-2"], "argument --nproc: -2: give a whole number"),
    (["run", "lora_sft", "--nproc", "two"], "argument --nproc: two: give a whole number"),
    (["run", "lora_sft", "--bogus", "peft.r=4"], "unrecognized arguments: --bogus"),
    (["run", "lora_sft", "-m", "peft.r=2,4", "--nproc", "2"], "-m sweeps run one job after"),
    (["run"], "finetune run needs a recipe"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["data"], "finetune data [-h] COMMAND"),
    (["data", "inspekt"], "invalid choice: 'inspekt'"),
    (["validate"], "required: RECIPE"),
    (["cp", "lora_sft"], "required: DEST"),
    (["merge", "runs/a"], "required: OUT_DIR"),
    (["generate", "tiny"], "--prompt --prompts --interactive is required"),
])
def test_bad_input_exits_2(cli: Cli, args: list[str], expected: str, tmp_path: Path) -> None:
    if args[0] == "run" and len(args) > 1:
        args = [*args, f"output_dir={tmp_path / 'run'}"]
    result = cli(*args)
    assert result.code == 2, result.err
    last = result.err.splitlines()[-1]  # after any progress logged before the error was found
    assert last.startswith("error: ") and expected in last, result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "run").exists()


def test_bad_data_path_exits_2(cli: Cli) -> None:
    result = cli("data", "inspect", "lora_sft", "data.path=/no/such/data.jsonl")
    assert result.code == 2, result.err
    assert "/no/such/data.jsonl" in result.err


def test_output_dir_that_is_a_file(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = cli("run", "lora_sft", f"output_dir={target}")
    assert result.code == 2
    assert "is a file" in result.err
    assert target.read_text() == "keep me"


def test_existing_run_dir_is_not_touched(cli: Cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    result = cli("run", "lora_sft", f"output_dir={run_dir}")
    assert result.code == 2
    assert "resume=auto" in result.err
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_help(cli: Cli) -> None:
    top = cli("--help")
    assert top.code == 0
    assert "run RECIPE [OVERRIDES...] [--nproc N] [--nnodes M ...] [-m]" in top.out
    assert "data inspect RECIPE [OVERRIDES...] [--json]" in top.out
    assert "75 preempted" in top.out
    bare = cli()
    assert bare.code == 2 and bare.out == top.out
    run_help = cli("run", "--help")
    assert run_help.code == 0 and "--nproc N" in run_help.out and "-m, --multirun" in run_help.out


def test_ls_lists_every_recipe_and_every_group_option(cli: Cli) -> None:
    listing = cli("ls")
    assert listing.code == 0, listing.err
    lines = listing.out.splitlines()
    recipes = lines[1:lines.index("")]
    assert [line.split()[0] for line in recipes] == recipe_names()
    assert all(len(line.split()) > 1 for line in recipes)  # each with its description
    groups = {line.split()[0]: line.split(None, 1)[1] for line in lines[lines.index("") + 2:]}
    shipped = {f"{d.name}/": ", ".join(sorted(p.stem for p in d.glob("*.yaml")))
               for d in shipped_config_dir().iterdir() if d.is_dir() and any(d.glob("*.yaml"))}
    assert groups == shipped


def test_cp_then_validate_a_copied_config(cli: Cli, tmp_path: Path) -> None:
    copied = cli("cp", "lora_sft", str(tmp_path / "mine.yaml"))
    assert copied.code == 0, copied.err
    text = (tmp_path / "mine.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text + "trainer:\n  max_steps: 7\n")
    validated = cli("validate", str(tmp_path / "mine.yaml"), "peft.r=4")
    assert validated.code == 0, validated.err
    assert "max_steps: 7" in validated.out and "r: 4" in validated.out
    again = cli("cp", "lora_sft", str(tmp_path / "mine.yaml"))
    assert again.code == 2 and "already exists" in again.err


def test_validate_prints_plain_values(cli: Cli) -> None:
    result = cli("validate", "lora_sft", "trainer.on_nan=skip")
    assert result.code == 0, result.err
    assert "  method: lora\n" in result.out and "  on_nan: skip\n" in result.out
    assert "PeftMethod" not in result.out and "OnNan" not in result.out
