"""The dispatcher: what each verb receives, one composition per run, sweeps, exit codes."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import finetune.commands.ls
import finetune.commands.run
import finetune.config.compose
import finetune.train.launch
from finetune.errors import ConfigError, FinetuneError

Cli = Callable[..., Any]  # conftest.cli: (*args) -> (code, out, err)
HYDRA_SYNTAX = ["+data.columns.x=1", "~trainer", "peft.r=2,4", "optim.betas=[0.8,0.95]",
                "data.path='a b.jsonl'", "++seed=3", "model=tiny"]


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


def _record_runs(monkeypatch: pytest.MonkeyPatch, code: int = 0) -> list:
    """Replace finetune.train.run with a recipe runner that records each config it gets."""
    runs: list = []

    def run_recipe(cfg):
        runs.append(cfg)
        return code

    _fake_module(monkeypatch, "finetune.train.run", run_recipe=run_recipe)
    return runs


@pytest.mark.parametrize("position", range(len(HYDRA_SYNTAX) + 1))
def test_overrides_reach_run_unchanged_wherever_the_options_are(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, position: int) -> None:
    seen: list = []
    monkeypatch.setattr(finetune.commands.run, "run", lambda args: seen.append(args) or 0)
    words = [*HYDRA_SYNTAX[:position], "--nproc", "3", "-m", *HYDRA_SYNTAX[position:]]
    assert cli("run", "lora_sft", *words).code == 0
    (args,) = seen
    assert (args.recipe, args.overrides, args.nproc, args.multirun) == (
        "lora_sft", HYDRA_SYNTAX, 3, True)


@pytest.mark.parametrize(("argv", "module", "expected"), [
    (["env", "--profile", "h100", "--json", "kernels.attention=sdpa", "--help"], "env",
     ["--profile", "h100", "--json", "kernels.attention=sdpa", "--help"]),
    (["env"], "env", []),
    (["data", "inspect", "--json", "lora_sft", "data.packing=true", "~data.columns"],
     "data_inspect", ["--json", "lora_sft", "data.packing=true", "~data.columns"]),
])
def test_own_parser_verbs_get_every_word_after_the_verb(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str], module: str,
        expected: list[str]) -> None:
    seen: list = []
    _fake_module(monkeypatch, f"finetune.commands.{module}",
                 main=lambda words: seen.append(words) or 7)
    assert cli(*argv).code == 7
    assert seen == [expected]


def test_run_composes_once_and_calls_the_recipe(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    compositions: list = []
    real = finetune.config.compose.compose_run_config
    monkeypatch.setattr(finetune.config.compose, "compose_run_config",
                        lambda *a: compositions.append(a) or real(*a))
    runs = _record_runs(monkeypatch, code=75)
    result = cli("run", "lora_sft", "peft.r=4")
    assert result.code == 75
    assert compositions == [("lora_sft", ["peft.r=4"])]
    (cfg,) = runs
    assert cfg.peft.r == 4
    assert cfg.output_dir.startswith("runs/lora_sft-")
    assert list(tmp_path.iterdir()) == []  # the recipe makes the run directory, not the CLI


def test_nproc_relaunches_with_the_same_overrides_and_one_output_dir(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launches: list = []
    monkeypatch.setattr(finetune.train.launch, "launch_processes",
                        lambda *a: launches.append(a) or 75)
    runs = _record_runs(monkeypatch)
    assert cli("run", "lora_sft", "peft.r=4", "--nproc", "2").code == 75
    assert runs == []
    ((nproc, recipe, overrides, output_dir),) = launches
    assert (nproc, recipe, overrides[0]) == (2, "lora_sft", "peft.r=4")
    assert overrides[1:] == [f"output_dir={output_dir}"]
    assert str(output_dir).startswith("runs/lora_sft-")


def test_sweep_runs_each_job_in_output_dir_jobN(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    runs = _record_runs(monkeypatch)
    handlers = logging.getLogger().handlers[:]
    result = cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'sweep'}")
    assert result.code == 0, result.err
    assert [(cfg.peft.r, cfg.output_dir) for cfg in runs] == [
        (2, str(tmp_path / "sweep/job0")), (4, str(tmp_path / "sweep/job1"))]
    # Hydra records the sweep in OUTPUT_DIR and creates nothing else, nor touches logging.
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["multirun.yaml"]
    assert logging.getLogger().handlers == handlers


def test_a_failing_sweep_job_does_not_stop_the_others(
        cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    ran: list = []

    def run_recipe(cfg):
        ran.append(cfg.peft.r)
        if cfg.peft.r == 2:
            raise ConfigError("job zero is wrong")
        return 0

    _fake_module(monkeypatch, "finetune.train.run", run_recipe=run_recipe)
    result = cli("run", "lora_sft", "-m", "peft.r=2,4", f"output_dir={tmp_path / 'sweep'}")
    assert ran == [2, 4]
    assert result.code == 2
    assert result.err.startswith("error: job 0 (") and result.err.count("\n") == 1
    assert "peft.r=2): job zero is wrong" in result.err


def _all_subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_all_subclasses(direct))]


def test_every_finetune_error_exits_with_its_exit_code(
        cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("finetune.errors", "finetune.data.errors", "finetune.kernels"):
        importlib.import_module(module)  # defines its FinetuneErrors
    for cls in [FinetuneError, *_all_subclasses(FinetuneError)]:
        def fail(_args: object, cls: type = cls) -> int:
            # __new__ alone: subclasses build their message from their own arguments.
            raise cls.__new__(cls, f"{cls.__name__}: what went wrong, where, and the fix")

        monkeypatch.setattr(finetune.commands.ls, "run", fail)
        result = cli("ls")
        assert result.code == cls.exit_code, cls
        assert result.err == f"error: {cls.__name__}: what went wrong, where, and the fix\n"


def test_a_bug_keeps_its_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_args: object) -> int:
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(finetune.commands.ls, "run", fail)
    with pytest.raises(KeyError):
        cli("ls")
