"""The kernel table in the docs is the generated one, and its script catches a stale copy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from finetune.kernels.table import markdown_kernel_table

ROOT = Path(__file__).resolve().parents[3]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", ["README.md", "docs/hardware-and-kernels.md"])
def test_docs_table_equals_generated_table(doc: str) -> None:
    kernel_table = _load("kernel_table")
    text = (ROOT / doc).read_text()
    assert kernel_table.table_in_doc(text) == markdown_kernel_table(), (
        f"{doc} is stale: run python scripts/kernel_table.py --write"
    )


def test_kernel_table_check_detects_a_stale_doc(tmp_path: Path) -> None:
    kernel_table = _load("kernel_table")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- kernel-table:start -->\n| old |\n<!-- kernel-table:end -->\n")
    assert kernel_table.main(["--check", "--doc", str(doc)]) == 1
    assert kernel_table.main(["--write", "--doc", str(doc)]) == 0
    assert kernel_table.main(["--check", "--doc", str(doc)]) == 0
    assert doc.read_text().startswith("intro\n<!-- kernel-table:start -->\n| profile |")
