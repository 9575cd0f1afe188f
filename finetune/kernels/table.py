"""How kernel plans are shown: the start-of-run summary of one plan, and the Markdown table of
plan choices per named profile.

`format_plan_table` is printed by `finetune run` and `finetune env`. `markdown_kernel_table` is
used by `finetune env --table`, scripts/kernel_table.py and docs/hardware-and-kernels.md, and a
test keeps the copy in the docs equal to it.
"""

from __future__ import annotations

from finetune.config.kernels import KernelsConfig
from finetune.hardware.profile import HardwareProfile
from finetune.hardware.simulated import PROFILE_NAMES, profile_by_name
from finetune.kernels.kernel_plan import FAMILIES, KernelPlan
from finetune.kernels.planner import plan

TABLE_START = "<!-- kernel-table:start -->"
TABLE_END = "<!-- kernel-table:end -->"


def _hardware_line(profile: HardwareProfile) -> str:
    peak = (
        f"{profile.peak_bf16_tflops:g} bf16 TFLOP/s peak"
        if profile.peak_bf16_tflops is not None
        else "peak unknown"
    )
    memory = f"{profile.memory_gb:g} GiB" if profile.memory_gb is not None else "memory unknown"
    simulated = ", simulated" if profile.simulated else ""
    return (
        f"hardware: {profile.name} ({profile.vendor} {profile.arch}, {profile.device_count} x "
        f"{memory}, {peak}, {profile.runtime}, torch {profile.torch}{simulated})"
    )


def format_plan_table(kernel_plan: KernelPlan) -> str:
    """The human summary printed at the start of a run: `family: choice (reason)` per line."""
    lines = [_hardware_line(kernel_plan.hardware)]
    for family in FAMILIES:
        decision = kernel_plan.kernels[family]
        notes = [decision.reason]
        details = decision.details
        if "selfcheck" in details:
            notes.append(f"self-check {details['selfcheck']}")
        if details.get("attn_implementation", decision.choice) != decision.choice:
            notes.append(f"attn_implementation={details['attn_implementation']}")
        if "sdpa_backend" in details:
            notes.append(
                f"SDPA backend {details['sdpa_backend']}, {details['sdpa_backend_masked']} "
                "with a mask"
            )
        if details.get("cudnn_sdpa"):
            notes.append(f"cuDNN routing {details['cudnn_sdpa']}")
        if family == "attention":
            notes.append(f"packing {'on' if kernel_plan.packing else 'off'}")
        if family == "precision":
            notes.append(
                f"base {details['base_dtype']}, trainable {details['trainable_dtype']}, "
                f"autocast {'on' if details['autocast'] else 'off'}, "
                f"grad scaler {'on' if details['grad_scaler'] else 'off'}, "
                f"tf32 {details['tf32_reason']}"
            )
        if family == "fused_ops" and kernel_plan.fused_ops:
            notes.append("ops " + ", ".join(kernel_plan.fused_ops))
        if family == "fused_ops" and "loss_head" in details:
            notes.append(f"loss head {details['loss_head']}: {details['loss_head_reason']}; "
                         f"self-check {details['loss_head_selfcheck']}")
        lines.append(f"{family}: {decision.choice} ({'; '.join(notes)})")
    for name, value in kernel_plan.env.items():
        lines.append(f"env: {name}={value} ({kernel_plan.env_reasons.get(name, '')})")
    return "\n".join(lines)


def _precision_cell(kernel_plan: KernelPlan) -> str:
    extras = []
    if kernel_plan.grad_scaler:
        extras.append("grad scaler")
    if kernel_plan.tf32:
        extras.append("tf32")
    return kernel_plan.precision + (f" ({', '.join(extras)})" if extras else "")


def _attention_cell(kernel_plan: KernelPlan) -> str:
    decision = kernel_plan.kernels["attention"]
    if "sdpa_backend" not in decision.details:
        return decision.choice
    # Packed rows carry a dense mask on the SDPA path, so the masked backend is the one that
    # runs there; sdpa_varlen calls SDPA per document, without a mask.
    masked = kernel_plan.packing_isolation == "block_mask_4d"
    backend = decision.details["sdpa_backend_masked" if masked else "sdpa_backend"]
    return f"{decision.choice} ({backend.upper() if backend == 'math' else backend})"


def _fused_ops_cell(kernel_plan: KernelPlan) -> str:
    choice = kernel_plan.choice("fused_ops")
    if choice == "liger" and "fused_linear_cross_entropy" not in kernel_plan.fused_ops:
        return "liger (no FLCE)"
    return choice


def markdown_kernel_table(assume_packages: str = "all") -> str:
    """One row per named profile: vendor/arch -> attention (whole rows and packed rows),
    optimizer, fused ops, precision, collective."""
    rows = [
        "| profile | vendor | arch | attention | attention, packed | optimizer | fused ops "
        "| precision | collective |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PROFILE_NAMES:
        profile = profile_by_name(name, assume_packages)
        kernel_plan = plan(profile, KernelsConfig())
        packed = plan(profile, KernelsConfig(), packing=True)
        hw = kernel_plan.hardware
        rows.append(
            f"| {name} | {hw.vendor} | {hw.arch} | {_attention_cell(kernel_plan)} | "
            f"{_attention_cell(packed)} | "
            f"{kernel_plan.optimizer} | {_fused_ops_cell(kernel_plan)} | "
            f"{_precision_cell(kernel_plan)} | {kernel_plan.collective} |"
        )
    return "\n".join(rows) + "\n"
