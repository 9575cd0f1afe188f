"""finetune.kernels is layered: families -> plan type -> planner -> apply / present.

Family modules know only the shared registry pieces, so they can never import the planner or
the plan back (the old fused_ops <-> planner circle); choosing, applying and presenting stay
in separate modules. Imports inside functions count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[3] / "finetune" / "kernels"
FAMILY_MODULES = ("attention", "optimizer", "precision", "fused_ops", "lora", "collective",
                  "compilation")
# Module -> the finetune.kernels modules it may import.
ALLOWED: dict[str, set[str]] = {
    "registry": set(),
    "sdpa": {"registry"},  # SDPA backend facts, shared by attention and apply
    "varlen_sdpa": {"sdpa"},  # the sdpa_varlen attention function transformers calls
    # torch's varlen attention behind transformers' interface; other calls go to sdpa_varlen
    "varlen_torch": {"registry", "sdpa", "varlen_sdpa"},
    "lora_linear": set(),  # the fused LoRA forward apply patches in
    "chunked_loss": set(),  # the chunked linear cross-entropy and the LM head that runs it
    **{name: {"registry"} for name in FAMILY_MODULES},
    "attention": {"registry", "sdpa", "varlen_sdpa", "varlen_torch"},
    "kernel_plan": {"registry"},
    # the loss-head family: Liger's (its support shared with fused_ops), chunked, unfused
    "loss_head": {"registry", "fused_ops", "chunked_loss"},
    "selfcheck": {"registry", "attention", "optimizer", "kernel_plan", "loss_head"},
    "apply": {"kernel_plan", "fused_ops", "lora", "lora_linear", "sdpa", "chunked_loss"},
    # The planner calls apply's environment step before its self-checks (see planner.py).
    "planner": {"registry", "kernel_plan", "selfcheck", "apply", "sdpa", "loss_head",
                "autotune", *FAMILY_MODULES},
    "table": {"kernel_plan", "planner"},
    # kernels.autotune: the timed steps of the candidates, the timing/choice/cache the planner
    # asks, and the run's tuned plan (above the planner: it plans twice, rank 0 then all)
    "workloads": {"registry", "attention", "optimizer", "kernel_plan", "lora_linear", "sdpa",
                  "varlen_sdpa"},
    "autotune": {"registry", "workloads"},
    "tuned_plan": {"autotune", "kernel_plan", "planner", "registry", "workloads"},
}


def kernels_imports(source: str) -> set[str]:
    """The finetune.kernels submodules `source` imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["finetune", "kernels"] and len(parts) > 2:
                if (KERNELS / f"{parts[2]}.py").exists():
                    found.add(parts[2])
            elif name == "finetune.kernels":
                found.add("__init__")
    return found


def test_the_checker_sees_imports_inside_functions() -> None:
    source = "def f():\n    from finetune.kernels.planner import KernelPlan\n"
    assert kernels_imports(source) == {"planner"}
    assert kernels_imports("from finetune.kernels import plan\n") == {"__init__"}


def test_every_module_is_listed() -> None:
    modules = {p.stem for p in KERNELS.glob("*.py")} - {"__init__"}
    assert modules == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_lower_layers(module: str) -> None:
    imported = kernels_imports((KERNELS / f"{module}.py").read_text(encoding="utf-8"))
    assert imported <= ALLOWED[module], (
        f"finetune/kernels/{module}.py imports {sorted(imported - ALLOWED[module])}"
    )
