"""An install without finetune's dependencies names every missing one and the offline install
command, in one paragraph, exit 1; other import errors keep their traceback."""

from __future__ import annotations

import sys

import pytest

from finetune import cli
from finetune.dependencies import (
    declared_dependencies,
    missing_dependencies,
    missing_dependency_message,
)


def test_declared_dependencies_are_pyprojects() -> None:
    declared = declared_dependencies()
    assert {"torch", "hydra-core", "omegaconf", "orjson"} <= set(declared)
    assert "pytest" not in declared  # extras are left out


def test_only_what_is_not_installed_is_missing() -> None:
    assert missing_dependencies(["omegaconf", "no-such-distribution-xyz"]) == [
        "no-such-distribution-xyz"]


def test_a_missing_dependency_is_named_with_the_install_command(monkeypatch, capsys) -> None:
    monkeypatch.setattr("finetune.dependencies.missing_dependencies",
                        lambda names=None: ["hydra-core", "omegaconf"])
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    monkeypatch.delitem(sys.modules, "finetune.config.compose", raising=False)  # imported anew
    assert cli.main(["validate", "lora_sft"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the Python package 'omegaconf' is not installed")
    assert "missing here: hydra-core, omegaconf;" in err
    assert "pip install --no-index --find-links wheelhouse finetune" in err
    assert "Traceback" not in err


def test_only_an_import_of_a_missing_dependency_is_explained(monkeypatch) -> None:
    monkeypatch.setattr("finetune.dependencies.missing_dependencies",
                        lambda names=None: ["hydra-core", "orjson"])
    hydra = ModuleNotFoundError("No module named 'hydra.core'", name="hydra.core")
    message = missing_dependency_message(hydra)
    assert message is not None and message.startswith("the Python package 'hydra' is not")
    assert "missing here: hydra-core, orjson;" in message
    unrelated = ModuleNotFoundError("No module named 'no_such_module'", name="no_such_module")
    assert missing_dependency_message(unrelated) is None


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    def broken(argv):
        raise ModuleNotFoundError("No module named 'no_such_module'", name="no_such_module")

    monkeypatch.setattr(cli, "dispatch", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["env"])
