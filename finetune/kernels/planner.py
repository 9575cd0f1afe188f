"""`plan(profile, cfg) -> KernelPlan`: one decision per op family, each with its reason.

Order of decisions: precision first (attention depends on the dtype), then attention,
optimizer, fused ops, compile and collective. `auto` takes the best-ranked supported candidate
that passes its self-check; any other value is honoured when supported and raises
`KernelOverrideError` when not - never silently replaced.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware.arch import device_type, rank_family
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.attention import (
    ATTENTION,
    AttentionCandidate,
    attention_details,
    attention_env,
)
from finetune.kernels.collective import COLLECTIVE
from finetune.kernels.compilation import COMPILE
from finetune.kernels.fused_ops import FLCE_SETTINGS, FUSED_OPS, fused_ops_details
from finetune.kernels.optimizer import OPTIMIZER, OptimizerCandidate
from finetune.kernels.precision import (
    PRECISION,
    TORCH_DTYPES,
    precision_details,
    precision_env,
)
from finetune.kernels.registry import (
    Candidate,
    FamilyDecision,
    KernelOverrideError,
    ModelFacts,
    Registry,
    Rejection,
)
from finetune.kernels.selfcheck import check_attention, check_optimizer

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = (
    "attention", "optimizer", "fused_ops", "compile", "precision", "collective"
)
# Shape the attention self-check uses when the model's is not known yet.
SELFCHECK_FACTS = ModelFacts(num_heads=8, num_kv_heads=4, head_dim=32)


@dataclass(frozen=True)
class KernelRegistries:
    """The candidate registry of every family; pass a modified copy to `plan` to inject one."""

    attention: Registry[AttentionCandidate]
    optimizer: Registry[OptimizerCandidate]
    fused_ops: Registry[Candidate]
    compile: Registry[Candidate]
    precision: Registry[Candidate]
    collective: Registry[Candidate]


def default_registries() -> KernelRegistries:
    """Independent copies of the built-in registries (safe to modify)."""
    return KernelRegistries(
        attention=ATTENTION.copy(),
        optimizer=OPTIMIZER.copy(),
        fused_ops=FUSED_OPS.copy(),
        compile=COMPILE.copy(),
        precision=PRECISION.copy(),
        collective=COLLECTIVE.copy(),
    )


_BUILTIN = KernelRegistries(ATTENTION, OPTIMIZER, FUSED_OPS, COMPILE, PRECISION, COLLECTIVE)


@dataclass(frozen=True)
class KernelPlan:
    """The chosen kernels for one run. `to_dict()` is kernel_plan.json."""

    hardware: HardwareProfile
    kernels: dict[str, FamilyDecision]
    env: dict[str, str] = field(default_factory=dict)
    env_reasons: dict[str, str] = field(default_factory=dict)
    model_facts: ModelFacts = field(default_factory=ModelFacts)

    def choice(self, family: str) -> str:
        """The chosen candidate name of `family` (one of FAMILIES)."""
        return self.kernels[family].choice

    @property
    def attn_implementation(self) -> str:
        """The value for transformers' `attn_implementation`."""
        return self.choice("attention")

    @property
    def packing_isolation(self) -> str | None:
        """varlen | block_mask_4d | flex_block_mask; None when packing cannot be isolated."""
        return self.kernels["attention"].details.get("packing_isolation")

    @property
    def base_dtype(self) -> torch.dtype:
        """dtype for frozen (base) weights."""
        return TORCH_DTYPES[self.kernels["precision"].details["base_dtype"]]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """dtype to autocast the forward to; None for no autocast."""
        decision = self.kernels["precision"]
        return TORCH_DTYPES[decision.choice] if decision.details["autocast"] else None

    @property
    def grad_scaler(self) -> bool:
        """True when the loss must be scaled (fp16)."""
        return bool(self.kernels["precision"].details["grad_scaler"])

    def to_dict(self) -> dict[str, Any]:
        """{"hardware": {...}, "kernels": {family: {...}}, "env": {...}}."""
        return {
            "hardware": self.hardware.to_dict(),
            "kernels": {name: self.kernels[name].to_dict() for name in FAMILIES},
            "env": dict(self.env),
        }


def _machine(profile: HardwareProfile) -> str:
    return f"{profile.name} ({profile.arch})"


@dataclass
class _Selection:
    candidate: Candidate
    reason: str
    rejected: list[Rejection]
    failures: list[tuple[str, str]]


def _select(
    family: str,
    registry: Registry[Any],
    requested: str,
    profile: HardwareProfile,
    facts: ModelFacts,
    check: Callable[[Any], str | None] | None = None,
) -> _Selection:
    ranked = registry.ranked(profile)
    verdicts = {c.name: c.supports(profile, facts) for c in ranked}
    possible = [c.name for c in ranked if verdicts[c.name][0]]
    if requested != "auto":
        if requested not in registry:
            raise KernelOverrideError(
                family, requested,
                f"{requested!r} is not a known {family} choice (known: {', '.join(registry.names())})",
                alternatives=possible,
            )
        ok, why = verdicts[requested]
        if not ok:
            raise KernelOverrideError(
                family, requested, f"{requested} {why}", machine=_machine(profile),
                alternatives=[n for n in possible if n != requested],
            )
        order = [registry.get(requested)]
    else:
        order = [c for c in ranked if verdicts[c.name][0] and c.auto]
    failures: list[tuple[str, str]] = []
    chosen: Candidate | None = None
    for candidate in order:
        failure = check(candidate) if check is not None else None
        if failure is None:
            chosen = candidate
            break
        logger.warning("%s: %s failed its self-check: %s", family, candidate.name, failure)
        failures.append((candidate.name, failure))
        if requested != "auto":
            raise KernelOverrideError(
                family, requested, f"{requested} failed its self-check: {failure}",
                machine=_machine(profile), alternatives=[n for n in possible if n != requested],
            )
    if chosen is None:
        detail = "; ".join(f"{n}: {w}" for n, w in failures) or "no candidate is supported"
        raise RuntimeError(f"no {family} kernel works on {_machine(profile)}: {detail}")
    failed = dict(failures)
    rejected: list[Rejection] = []
    for candidate in ranked:
        if candidate is chosen:
            continue
        ok, why = verdicts[candidate.name]
        if candidate.name in failed:
            why = f"self-check failed: {failed[candidate.name]}"
        elif ok and requested != "auto":
            why = f"supported; not requested (kernels.{family}={requested})"
        elif ok and not candidate.auto:
            why = f"supported; {candidate.not_auto_reason}"
        elif ok:
            why = f"supported; ranked below {chosen.name} on {rank_family(profile)}"
        rejected.append(Rejection(candidate.name, why))
    own = verdicts[chosen.name][1]
    if requested != "auto":
        reason = f"{own}; set by kernels.{family}={requested}"
    else:
        above = [r for r in rejected if ranked.index(registry.get(r.name)) < ranked.index(chosen)]
        reason = "; ".join([own] + [f"{r.name}: {r.reason}" for r in above])
    return _Selection(chosen, reason, rejected, failures)


def _selfcheck_skip(profile: HardwareProfile, cfg: KernelsConfig, run: bool | None) -> str | None:
    if profile.simulated:
        return "not run (simulated profile)"
    if run is False:
        return "skipped (disabled by the caller)"
    if run is None and not cfg.selfcheck:
        return "skipped (kernels.selfcheck=false)"
    return None


def _selfcheck_status(skip: str | None, selection: _Selection) -> str:
    if skip is not None:
        return skip
    if selection.failures:
        why = "; ".join(w for _, w in selection.failures)
        return f"failed: {why} -> fell back to {selection.candidate.name}"
    return "passed"


def _decision(family: str, selection: _Selection, details: dict[str, Any]) -> FamilyDecision:
    return FamilyDecision(
        family, selection.candidate.name, selection.reason, tuple(selection.rejected), details
    )


def plan(
    profile: HardwareProfile,
    cfg: KernelsConfig,
    model_facts: ModelFacts | None = None,
    run_selfcheck: bool | None = None,
    *,
    registries: KernelRegistries | None = None,
) -> KernelPlan:
    """Choose every op family's kernel for `profile`.

    Args:
        profile: from `detect()` (self-checked) or a simulated profile (never self-checked).
        cfg: `auto` or an explicit choice per family.
        model_facts: head counts and head_dim of the model, when known.
        run_selfcheck: None follows `cfg.selfcheck`; True/False forces it (real profiles only).
        registries: candidates to choose from; `default_registries()` copies by default.

    Raises:
        KernelOverrideError: an explicit choice is unknown, unsupported here, or fails its
            self-check.
    """
    regs = registries or _BUILTIN
    skip = _selfcheck_skip(profile, cfg, run_selfcheck)
    device = device_type(profile)
    facts = model_facts or ModelFacts()

    precision = _select("precision", regs.precision, cfg.precision, profile, facts)
    facts = replace(facts, dtype=precision.candidate.name)
    shape_known = bool(facts.num_heads and facts.num_kv_heads and facts.head_dim)
    check_facts = facts if shape_known else replace(SELFCHECK_FACTS, dtype=facts.dtype)

    started = time.perf_counter()
    attention = _select(
        "attention", regs.attention, cfg.attention, profile, facts,
        check=None if skip else lambda c: check_attention(c, check_facts, device),
    )
    optimizer = _select(
        "optimizer", regs.optimizer, cfg.optimizer, profile, facts,
        check=None if skip else lambda c: check_optimizer(c, device),
    )
    if skip is None:
        logger.debug("kernel self-checks took %.2fs", time.perf_counter() - started)
    fused_ops = _select("fused_ops", regs.fused_ops, cfg.fused_ops, profile, facts)
    compile_ = _select("compile", regs.compile, cfg.compile, profile, facts)
    collective = _select("collective", regs.collective, cfg.collective, profile, facts)

    flce = cfg.fused_linear_cross_entropy
    if flce not in FLCE_SETTINGS:
        raise KernelOverrideError(
            "fused_linear_cross_entropy", flce, f"{flce!r} is not one of {', '.join(FLCE_SETTINGS)}",
        )
    if flce == "on" and fused_ops.candidate.name != "liger":
        raise KernelOverrideError(
            "fused_linear_cross_entropy", flce,
            f"needs kernels.fused_ops=liger, and fused_ops is {fused_ops.candidate.name} here",
            machine=_machine(profile), alternatives=["off"],
        )

    attention_candidate = attention.candidate
    assert isinstance(attention_candidate, AttentionCandidate)
    kernels = {
        "attention": _decision("attention", attention, {
            "selfcheck": _selfcheck_status(skip, attention),
            **attention_details(profile, attention_candidate, facts),
        }),
        "optimizer": _decision("optimizer", optimizer, {
            "selfcheck": _selfcheck_status(skip, optimizer),
        }),
        "fused_ops": _decision(
            "fused_ops", fused_ops, fused_ops_details(profile, fused_ops.candidate.name, flce)
        ),
        "compile": _decision("compile", compile_, {}),
        "precision": _decision(
            "precision", precision, precision_details(profile, precision.candidate.name)
        ),
        "collective": _decision("collective", collective, {}),
    }
    env_entries = {**attention_env(profile), **precision_env(profile)}
    result = KernelPlan(
        hardware=profile,
        kernels=kernels,
        env={k: v for k, (v, _) in env_entries.items()},
        env_reasons={k: why for k, (_, why) in env_entries.items()},
        model_facts=facts,
    )
    logger.debug("kernel plan: %s", result.to_dict())
    return result


def apply_env(plan: KernelPlan) -> dict[str, str]:
    """Put the plan's environment variables into os.environ and enable TF32 where planned.

    Call before the first CUDA/HIP call: ROCm and torch read several of these once at start.
    A variable the user already set to another value is kept (explicit beats automatic) and
    logged. Returns the variables this call set.
    """
    applied: dict[str, str] = {}
    for name, value in plan.env.items():
        current = os.environ.get(name)
        if current is not None and current != value:
            logger.warning(
                "env: keeping %s=%s from the environment (the plan would set %s)",
                name, current, value,
            )
            continue
        os.environ[name] = value
        applied[name] = value
    if plan.kernels["precision"].details.get("tf32") and plan.hardware.vendor in ("nvidia", "amd"):
        torch.set_float32_matmul_precision("high")
    return applied


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


def format_plan_table(plan: KernelPlan) -> str:
    """The human summary printed at the start of a run: `family: choice (reason)` per line."""
    lines = [_hardware_line(plan.hardware)]
    for family in FAMILIES:
        decision = plan.kernels[family]
        notes = [decision.reason]
        details = decision.details
        if "selfcheck" in details:
            notes.append(f"self-check {details['selfcheck']}")
        if "sdpa_backend" in details:
            notes.append(
                f"SDPA backend {details['sdpa_backend']}, {details['sdpa_backend_masked']} "
                "with a mask"
            )
        if family == "precision":
            notes.append(
                f"base {details['base_dtype']}, trainable {details['trainable_dtype']}, "
                f"autocast {'on' if details['autocast'] else 'off'}, "
                f"grad scaler {'on' if details['grad_scaler'] else 'off'}, "
                f"tf32 {'on' if details['tf32'] else 'off'}"
            )
        if family == "fused_ops" and details.get("ops"):
            notes.append("ops " + ", ".join(details["ops"]))
        lines.append(f"{family}: {decision.choice} ({'; '.join(notes)})")
    for name, value in plan.env.items():
        lines.append(f"env: {name}={value} ({plan.env_reasons.get(name, '')})")
    return "\n".join(lines)
