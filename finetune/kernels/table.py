"""The Markdown table of plan choices per named profile, generated from the registries.

`finetune env --table`, scripts/kernel_table.py and docs/hardware-and-kernels.md all use this
one function, and a test keeps the copy in the docs equal to it.
"""

from __future__ import annotations

from finetune.config.kernels import KernelsConfig
from finetune.hardware.simulated import PROFILE_NAMES, profile_by_name
from finetune.kernels.planner import KernelPlan, plan

TABLE_START = "<!-- kernel-table:start -->"
TABLE_END = "<!-- kernel-table:end -->"


def _precision_cell(kernel_plan: KernelPlan) -> str:
    decision = kernel_plan.kernels["precision"]
    extras = []
    if decision.details["grad_scaler"]:
        extras.append("grad scaler")
    if decision.details["tf32"]:
        extras.append("tf32")
    return decision.choice + (f" ({', '.join(extras)})" if extras else "")


def _attention_cell(kernel_plan: KernelPlan) -> str:
    decision = kernel_plan.kernels["attention"]
    if decision.choice != "sdpa":
        return decision.choice
    backend = decision.details["sdpa_backend"]
    return f"sdpa ({backend.upper() if backend == 'math' else backend})"


def _fused_ops_cell(kernel_plan: KernelPlan) -> str:
    decision = kernel_plan.kernels["fused_ops"]
    if decision.choice == "liger" and "fused_linear_cross_entropy" not in decision.details["ops"]:
        return "liger (no FLCE)"
    return decision.choice


def markdown_kernel_table(assume_packages: str = "all") -> str:
    """One row per named profile: vendor/arch -> attention, optimizer, fused ops, precision."""
    rows = [
        "| profile | vendor | arch | attention | optimizer | fused ops | precision | collective |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in PROFILE_NAMES:
        kernel_plan = plan(profile_by_name(name, assume_packages), KernelsConfig())
        hw = kernel_plan.hardware
        rows.append(
            f"| {name} | {hw.vendor} | {hw.arch} | {_attention_cell(kernel_plan)} | "
            f"{kernel_plan.choice('optimizer')} | {_fused_ops_cell(kernel_plan)} | "
            f"{_precision_cell(kernel_plan)} | {kernel_plan.choice('collective')} |"
        )
    return "\n".join(rows) + "\n"
