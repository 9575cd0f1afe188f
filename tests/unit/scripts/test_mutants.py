"""scripts/mutants.py: the catalog matches the code, every mutant compiles, and each generic
operator makes the change it names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import mutants  # noqa: E402
from mutants_catalog import CANARY, CURATED, MODULES  # noqa: E402


def test_every_curated_mutation_finds_its_code_once_and_every_mutant_parses() -> None:
    found = mutants.all_mutants(list(MODULES), REPO)
    assert len(found) >= len(CURATED)
    for mutant in found:
        ast.parse(mutant.source)
        assert mutant.source != (REPO / mutant.path).read_text(encoding="utf-8"), mutant
    mutants.curated_mutant(CANARY, (REPO / CANARY.path).read_text(encoding="utf-8"))


def test_every_module_has_tests_that_exist() -> None:
    for path, spec in MODULES.items():
        assert (REPO / path).is_file(), path
        files = [t for t in spec["tests"] if t.endswith(".py")]
        assert files, path
        for test in files:
            assert (REPO / test).is_file(), test


def test_a_stale_curated_mutation_is_a_catalog_error() -> None:
    entry = mutants.Curated("finetune/train/loss.py", "no such code", "x")
    with pytest.raises(mutants.CatalogError, match="occurs 0 times"):
        mutants.curated_mutant(entry, "a = 1\n")


def test_generic_operators_change_what_they_name() -> None:
    source = ("def f(xs, n, ok, done):\n"
              "    if n < 3 and ok:\n"
              "        xs.append(n)\n"
              "    return xs[1:n]\n")
    made = mutants.generic_mutants("m.py", source, ["f"], 99, ["t.py"])
    changes = {m.mutation: m.source for m in made}
    assert set(changes) == {"n < 3 -> n >= 3", "n < 3 and ok -> n < 3 or ok",
                            "xs.append(n) -> None", "1 -> (1) + 1", "n -> (n) + 1"}
    assert "if (n < 3 or ok):" in changes["n < 3 and ok -> n < 3 or ok"]
    assert "return xs[((1) + 1):n]" in changes["1 -> (1) + 1"]
    assert [m.line for m in made] == sorted(m.line for m in made)


def test_logger_calls_are_not_dropped() -> None:
    source = "def f(x):\n    logger.warning('x %s', x)\n    return x\n"
    assert mutants.generic_mutants("m.py", source, ["f"], 9, ["t.py"]) == []


def test_the_private_copy_holds_the_recipes_and_configs_it_imports() -> None:
    # The editable install maps finetune.recipes / finetune.configs to this working tree; the
    # copy must find its own first on its path, or recipes/ mutants are never imported.
    from importlib.machinery import PathFinder

    copy = mutants.private_copy("head")
    try:
        for package, folder in mutants.PACKAGE_DIRS.items():
            spec = PathFinder.find_spec(f"finetune.{package}", [str(copy / "finetune")])
            assert spec is not None, package
            found = Path(spec.submodule_search_locations[0]).resolve()
            assert found == (copy / folder).resolve(), (package, found)
    finally:
        mutants.shutil.rmtree(copy, ignore_errors=True)
