"""The docs table is the generated one; the scripts import and show --help on CPU."""

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


@pytest.mark.parametrize("script", ["gpu_check", "kernel_table"])
def test_scripts_import_and_show_help(script: str, capsys) -> None:
    module = _load(script)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_gpu_check_sections_report_failures_instead_of_raising() -> None:
    gpu_check = _load("gpu_check")
    report: dict = {}
    budget = gpu_check.Budget(60)

    def broken(out: dict) -> None:
        out["measured"] = 1.5
        raise RuntimeError("no kernel image is available")

    gpu_check.run_section(report, "attention", budget, 1, broken)
    assert report["attention"]["status"].startswith("failed: RuntimeError: no kernel image")
    assert report["attention"]["measured"] == 1.5  # partial results are kept
    gpu_check.run_section(report, "lora", gpu_check.Budget(0), 30, broken)
    assert report["lora"]["status"].startswith("skipped")
