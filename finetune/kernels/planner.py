"""`plan(profile, cfg) -> KernelPlan`: one decision per op family, each with its reason.

Order of decisions: precision first (attention depends on the dtype), then the environment
the plan needs, then attention, optimizer, fused ops, LoRA, compile and collective. `auto` takes the
best-ranked supported candidate that passes its self-check; any other value is honoured when
supported and raises `KernelOverrideError` when not - never silently replaced. Attention is
ranked per architecture family and per packing mode (`plan(..., packing=True)`).

The environment is decided from the profile alone and, when self-checks will run in this
process, put in place (`finetune.kernels.apply.apply_env_vars`, or the `prepare_env` given)
BEFORE the first self-check: torch reads TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL once, at the
first SDPA call (pytorch/pytorch#134498), and flash-attn reads FLASH_ATTENTION_TRITON_AMD_ENABLE
when first imported, so a self-check run first would freeze the wrong setting while reporting
"passed". A simulated profile is never self-checked, so planning for it touches nothing.
Otherwise this module only chooses: `finetune.kernels.apply` carries a plan out (`apply_env`
again, then TF32 and the SDPA routing) and `finetune.kernels.table` shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from finetune.config.kernels import KernelsConfig
from finetune.hardware.arch import device_type, rank_family
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.apply import apply_env_vars
from finetune.kernels.attention import (
    ATTENTION,
    AttentionCandidate,
    attention_details,
    attention_env,
)
from finetune.kernels.autotune import Timing, Tuner, pick
from finetune.kernels.collective import COLLECTIVE
from finetune.kernels.compilation import COMPILE
from finetune.kernels.fused_ops import FUSED_OPS, flce_enabled, fused_ops_details
from finetune.kernels.kernel_plan import FAMILIES, KernelPlan
from finetune.kernels.lora import LORA
from finetune.kernels.loss_head import (
    LOSS_HEAD,
    SETTING_TO_CANDIDATE,
    LossHeadCandidate,
    loss_heads_for,
    setting_reason,
)
from finetune.kernels.optimizer import OPTIMIZER, OptimizerCandidate
from finetune.kernels.precision import PRECISION, precision_details, precision_env
from finetune.kernels.registry import (
    Candidate,
    FamilyDecision,
    KernelOverrideError,
    ModelFacts,
    Registry,
    Rejection,
)
from finetune.kernels.selfcheck import check_attention, check_loss_head, check_optimizer

logger = logging.getLogger(__name__)

# Shape the attention self-check uses when the model's is not known yet.
SELFCHECK_FACTS = ModelFacts(num_heads=8, num_kv_heads=4, head_dim=32)


@dataclass(frozen=True)
class KernelRegistries:
    """The candidate registry of every family; pass a modified copy to `plan` to inject one."""

    attention: Registry[AttentionCandidate]
    optimizer: Registry[OptimizerCandidate]
    fused_ops: Registry[Candidate]
    lora: Registry[Candidate]
    compile: Registry[Candidate]
    precision: Registry[Candidate]
    collective: Registry[Candidate]
    loss_head: Registry[LossHeadCandidate] = field(default_factory=LOSS_HEAD.copy)


def default_registries() -> KernelRegistries:
    """Independent copies of the built-in registries (safe to modify)."""
    return KernelRegistries(
        attention=ATTENTION.copy(),
        optimizer=OPTIMIZER.copy(),
        fused_ops=FUSED_OPS.copy(),
        lora=LORA.copy(),
        compile=COMPILE.copy(),
        precision=PRECISION.copy(),
        collective=COLLECTIVE.copy(),
    )


_BUILTIN = KernelRegistries(ATTENTION, OPTIMIZER, FUSED_OPS, LORA, COMPILE, PRECISION, COLLECTIVE)


def _machine(profile: HardwareProfile) -> str:
    return f"{profile.name} ({profile.arch})"


@dataclass
class _Selection:
    candidate: Candidate
    reason: str
    rejected: list[Rejection]
    failures: list[tuple[str, str]]
    measured: dict[str, Timing] | None = None
    verdict: str | None = None


def _select(
    family: str,
    registry: Registry[Any],
    requested: str,
    profile: HardwareProfile,
    facts: ModelFacts,
    check: Callable[[Any], str | None] | None = None,
    tuner: Tuner | None = None,
) -> _Selection:
    ranked = registry.ranked(profile, facts.packing)
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
    tuning = tuner is not None and requested == "auto"
    passing: list[Candidate] = []
    for candidate in order:
        failure = check(candidate) if check is not None else None
        if failure is None:
            chosen = chosen or candidate
            passing.append(candidate)
            if not tuning:
                break
            continue
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
    measured: dict[str, Timing] | None = None
    verdict: str | None = None
    if tuning and len(passing) > 1:
        assert tuner is not None
        measured = tuner.timings(family, passing)
        if measured:
            name, verdict = pick([c.name for c in passing], measured)
            chosen = registry.get(name)
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
        elif ok and measured and candidate.name in measured:
            why = (f"supported; measured {measured[candidate.name].median_ms:.3g} ms vs "
                   f"{chosen.name} {measured[chosen.name].median_ms:.3g} ms: {why}")
        elif ok:
            rows = " for packed rows" if facts.packing else ""
            why = f"supported; ranked below {chosen.name} on {rank_family(profile)}{rows}: {why}"
        rejected.append(Rejection(candidate.name, why))
    own = verdicts[chosen.name][1]
    if requested != "auto":
        reason = f"{own}; set by kernels.{family}={requested}"
    else:
        above = [r for r in rejected if ranked.index(registry.get(r.name)) < ranked.index(chosen)]
        reason = "; ".join([own] + [f"{r.name}: {r.reason}" for r in above])
        if verdict is not None:
            reason = f"{reason}; {verdict}"
    return _Selection(chosen, reason, rejected, failures, measured, verdict)


def check_choices(cfg: KernelsConfig, registries: KernelRegistries | None = None) -> None:
    """KernelOverrideError for a `kernels.<family>` value that names no candidate, before any
    work (whether the machine supports the choice is decided by `plan`)."""
    regs = registries or _BUILTIN
    for family in FAMILIES:
        requested = getattr(cfg, family)
        registry = getattr(regs, family)
        if requested != "auto" and requested not in registry:
            raise KernelOverrideError(
                family, requested,
                f"{requested!r} is not a known {family} choice (known: "
                f"{', '.join(registry.names())})")


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
    if selection.measured:
        details = {**details, "measured_ms": {n: round(t.median_ms, 4)
                                              for n, t in selection.measured.items()}}
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
    packing: bool = False,
    prepare_env: Callable[[Mapping[str, str]], object] | None = None,
    tuner: Tuner | None = None,
) -> KernelPlan:
    """Choose every op family's kernel for `profile`.

    Args:
        profile: from `detect()` (self-checked) or a simulated profile (never self-checked).
        cfg: `auto` or an explicit choice per family.
        model_facts: head counts and head_dim of the model, when known.
        run_selfcheck: None follows `cfg.selfcheck`; True/False forces it (real profiles only).
        registries: candidates to choose from; `default_registries()` copies by default.
        packing: the batches are packed rows of several documents (`data.packing`); attention
            then takes only paths that keep documents apart, ranked for packed rows.
        prepare_env: puts the plan's environment variables in place before the self-checks
            (only called when they run); `apply_env_vars` by default.
        tuner: times the candidates of a family that pass their self-checks when several do
            (kernels.autotune, finetune.kernels.autotune); the measured winner is chosen.

    Raises:
        KernelOverrideError: an explicit choice is unknown, unsupported here, or fails its
            self-check.
    """
    regs = registries or _BUILTIN
    skip = _selfcheck_skip(profile, cfg, run_selfcheck)
    device = device_type(profile)
    facts = replace(model_facts or ModelFacts(), packing=packing)

    precision = _select("precision", regs.precision, cfg.precision, profile, facts)
    facts = replace(facts, dtype=precision.candidate.name)
    env_entries = {**attention_env(profile), **precision_env(profile)}
    env = {k: v for k, (v, _) in env_entries.items()}
    if skip is None:
        (prepare_env or apply_env_vars)(env)
    shape_known = bool(facts.num_heads and facts.num_kv_heads and facts.head_dim)
    check_facts = facts if shape_known else replace(SELFCHECK_FACTS, dtype=facts.dtype)

    started = time.perf_counter()
    attention = _select(
        "attention", regs.attention, cfg.attention, profile, facts,
        check=None if skip else lambda c: check_attention(c, check_facts, device), tuner=tuner,
    )
    optimizer = _select(
        "optimizer", regs.optimizer, cfg.optimizer, profile, facts,
        check=None if skip else lambda c: check_optimizer(c, device), tuner=tuner,
    )
    if skip is None:
        logger.debug("kernel self-checks took %.2fs", time.perf_counter() - started)
    fused_ops = _select("fused_ops", regs.fused_ops, cfg.fused_ops, profile, facts, tuner=tuner)
    lora = _select("lora", regs.lora, cfg.lora, profile, facts, tuner=tuner)
    compile_ = _select("compile", regs.compile, cfg.compile, profile, facts)
    collective = _select("collective", regs.collective, cfg.collective, profile, facts)

    flce = cfg.fused_linear_cross_entropy
    if flce == "on" and fused_ops.candidate.name != "liger":
        raise KernelOverrideError(
            "fused_linear_cross_entropy", flce,
            f"needs kernels.fused_ops=liger, and fused_ops is {fused_ops.candidate.name} here",
            machine=_machine(profile), alternatives=["off"],
        )
    loss_head = _select(
        "fused_linear_cross_entropy",
        loss_heads_for(regs.loss_head, fused_ops.candidate.name, flce_enabled(profile, flce)),
        SETTING_TO_CANDIDATE.get(str(flce), "auto"), profile, facts,
        check=None if skip else lambda c: check_loss_head(c, device, facts.dtype), tuner=tuner,
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
        "fused_ops": _decision("fused_ops", fused_ops, {
            **fused_ops_details(profile, fused_ops.candidate.name, flce,
                                loss_head.candidate.name),
            "loss_head": loss_head.candidate.name,
            "loss_head_reason": setting_reason(loss_head.reason, str(flce)),
            "loss_head_selfcheck": _selfcheck_status(skip, loss_head),
            "loss_head_rejected": [r.to_dict() for r in loss_head.rejected],
            **({"loss_head_measured_ms": {n: round(t.median_ms, 4)
                                          for n, t in loss_head.measured.items()}}
               if loss_head.measured else {}),
        }),
        "lora": _decision("lora", lora, {}),
        "compile": _decision("compile", compile_, {}),
        "precision": _decision(
            "precision", precision, precision_details(profile, precision.candidate.name)
        ),
        "collective": _decision("collective", collective, {}),
    }
    result = KernelPlan(
        hardware=profile,
        kernels=kernels,
        env=env,
        env_reasons={k: why for k, (_, why) in env_entries.items()},
        model_facts=facts,
    )
    logger.debug("kernel plan: %s", result.to_dict())
    return result

