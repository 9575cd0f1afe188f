"""The speed benchmark's figures: medians per side, ratios, targets, the table and the JSON line.

Pure functions over the per-run results scripts/bench.py collects, so they are unit-tested
without running anything. A side is (who, mode): who is `ours` (`finetune run lora_sft`),
`reference` (the plain loop) or `trl` (SFTTrainer); mode is `unpacked` (padded rows; TRL's
defaults) or `packed`.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDE_NAMES = {
    ("ours", "unpacked"): "finetune, packing off",
    ("ours", "packed"): "finetune, data.packing=true",
    ("reference", "unpacked"): "reference loop, finetune's unpacked batches",
    ("reference", "packed"): "reference loop, finetune's packed batches",
    ("trl", "unpacked"): "TRL SFTTrainer, defaults",
    ("trl", "packed"): "TRL SFTTrainer, packing=True",
}
JSON_KEYS = ("ours_tokens_per_s", "ours_packed_tokens_per_s", "reference_tokens_per_s",
             "trl_tokens_per_s", "trl_packed_tokens_per_s", "overhead_vs_reference",
             "speedup_vs_trl", "speedup_vs_trl_packed", "startup_s", "trl_startup_s",
             "peak_rss_mb", "trl_peak_rss_mb")
# (ours >= x reference on identical batches, packed >= x TRL packed, unpacked >= x TRL default)
TARGETS = {"medium": (0.97, 2.5, 1.5), "small": (0.97, 4.0, 1.8)}


@dataclass
class RunResult:
    """One process of one side: its tokens/s, start-up, peak RSS, and per-step real tokens and
    losses (for the loss at equal tokens seen); `fill` is the real share of the tokens its timed
    batches held (the rest is padding); `rep` the repetition it belongs to; `clock` is what the
    side wrote (step times...) and `run_dir` where it ran."""

    side: tuple[str, str]
    tokens_per_s: float
    startup_s: float
    peak_rss_mb: float
    step_tokens: list[int]
    losses: list[float]
    cpu_s_per_ktok: float | None = None
    fill: float | None = None
    rep: int = 0
    clock: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None


@dataclass
class SideSummary:
    """Medians over a side's runs; `by_rep` holds (tokens/s, start-up) of each repetition."""

    side: tuple[str, str]
    runs: int
    tokens_per_s: float
    startup_s: float
    peak_rss_mb: float
    cpu_s_per_ktok: float | None
    fill: float | None = None
    loss_at_budget: float | None = None
    by_rep: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.higher_is_better else \
            self.value <= self.threshold

    def line(self) -> str:
        # A side left out (--sides, --no-trl) is neither a pass nor a miss.
        verdict = "SKIP" if self.value is None else "PASS" if self.passed else "MISS"
        sign = ">=" if self.higher_is_better else "<="
        shown = "not measured" if self.value is None else f"{self.value:.3f}"
        return f"{verdict} {self.name}: {shown} (target {sign} {self.threshold:g})"


def loss_at_tokens(step_tokens: Sequence[int], losses: Sequence[float], budget: int) -> float:
    """The mean loss of the steps that end in (budget / 2, budget] real tokens seen: the train
    loss "at `budget` tokens", averaged over a window so one batch's noise does not decide it.
    ValueError when the run saw fewer than `budget` tokens."""
    if len(step_tokens) != len(losses):
        raise ValueError(f"{len(step_tokens)} token counts for {len(losses)} losses")
    if sum(step_tokens) < budget:
        raise ValueError(f"the run saw {sum(step_tokens)} tokens, fewer than {budget}")
    seen, window = 0, []
    for tokens, loss in zip(step_tokens, losses, strict=True):
        seen += tokens
        if seen > budget:
            break
        if seen > budget / 2:
            window.append(loss)
    if not window:
        raise ValueError(f"no step ends between {budget / 2:g} and {budget} tokens")
    return statistics.fmean(window)


def summarize(results: Sequence[RunResult]) -> dict[tuple[str, str], SideSummary]:
    """Medians per side, and each side's loss at the tokens every side of its mode has seen
    (packed sides are compared with packed sides, unpacked with unpacked)."""
    by_side: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        by_side.setdefault(result.side, []).append(result)
    summary = {}
    for side, runs in by_side.items():
        cpu = [r.cpu_s_per_ktok for r in runs if r.cpu_s_per_ktok is not None]
        fill = [r.fill for r in runs if r.fill is not None]
        summary[side] = SideSummary(
            side=side, runs=len(runs),
            tokens_per_s=statistics.median(r.tokens_per_s for r in runs),
            startup_s=statistics.median(r.startup_s for r in runs),
            peak_rss_mb=statistics.median(r.peak_rss_mb for r in runs),
            cpu_s_per_ktok=statistics.median(cpu) if cpu else None,
            fill=statistics.median(fill) if fill else None,
            by_rep={r.rep: (r.tokens_per_s, r.startup_s) for r in runs})
    for mode in ("unpacked", "packed"):
        sides = [s for s in by_side if s[1] == mode]
        if not sides:
            continue
        budget = min(sum(r.step_tokens) for s in sides for r in by_side[s])
        for side in sides:
            summary[side].loss_at_budget = statistics.median(
                loss_at_tokens(r.step_tokens, r.losses, budget) for r in by_side[side])
    return summary


def loss_parity(results: Sequence[RunResult]) -> list[str]:
    """Per mode, the largest per-step loss difference between finetune and the reference loop
    (same batches, same seed): 0 means they computed the same training."""
    lines = []
    for mode in ("packed", "unpacked"):
        ours = [r.losses for r in results if r.side == ("ours", mode)]
        reference = [r.losses for r in results if r.side == ("reference", mode)]
        if ours and reference:
            diff = max(abs(a - b) for x in ours for y in reference
                       for a, b in zip(x, y, strict=True))
            lines.append(f"loss, finetune vs reference loop on the same {mode} batches: largest "
                         f"per-step difference {diff:.3g} over {len(ours[0])} steps")
    return lines


def _get(summary: dict[tuple[str, str], SideSummary], side: tuple[str, str],
         name: str) -> float | None:
    found = summary.get(side)
    return getattr(found, name) if found is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratio(summary: dict[tuple[str, str], SideSummary], ours: tuple[str, str],
                 other: tuple[str, str], index: int = 0) -> float | None:
    """The median over repetitions of ours / other within each repetition (`index` 0:
    tokens/s, 1: start-up). The runs of one repetition are minutes apart, so a change in the
    load of a shared machine hits both sides of the ratio; a ratio of the two medians could
    pair a quiet run of one side with a busy run of the other. None when either side is
    missing."""
    a, b = summary.get(ours), summary.get(other)
    if a is None or b is None:
        return None
    common = sorted(set(a.by_rep) & set(b.by_rep))
    if not common:
        return _ratio(a.tokens_per_s if index == 0 else a.startup_s,
                      b.tokens_per_s if index == 0 else b.startup_s)
    return statistics.median(a.by_rep[k][index] / b.by_rep[k][index] for k in common)


def ratios(summary: dict[tuple[str, str], SideSummary]) -> dict[str, float | None]:
    """tokens/s ratios (paired_ratio): ours / reference on the same batches, ours / TRL per
    mode."""
    return {
        "overhead_vs_reference": paired_ratio(summary, ("ours", "packed"),
                                              ("reference", "packed")),
        "overhead_vs_reference_unpacked": paired_ratio(summary, ("ours", "unpacked"),
                                                       ("reference", "unpacked")),
        "speedup_vs_trl": paired_ratio(summary, ("ours", "unpacked"), ("trl", "unpacked")),
        "speedup_vs_trl_packed": paired_ratio(summary, ("ours", "packed"), ("trl", "packed")),
    }


def cpu_ratios(summary: dict[tuple[str, str], SideSummary]) -> list[str]:
    """The same comparisons in process CPU time per real token (other side / ours, so above 1
    is ours ahead, as for tokens/s). On a shared machine wall time measures the neighbours as
    much as the side; CPU time per token (all threads, with OpenMP threads sleeping rather
    than spinning while they wait) does not, as long as the cores are not starved."""
    cpu = {side: s.cpu_s_per_ktok for side, s in summary.items()}
    lines = []
    for label, ours, other in (
            ("reference / ours, packed batches", ("ours", "packed"), ("reference", "packed")),
            ("reference / ours, unpacked batches", ("ours", "unpacked"),
             ("reference", "unpacked")),
            ("TRL packed / ours packed", ("ours", "packed"), ("trl", "packed")),
            ("TRL defaults / ours unpacked", ("ours", "unpacked"), ("trl", "unpacked"))):
        value = _ratio(cpu.get(other), cpu.get(ours))
        if value is not None:
            lines.append(f"CPU time per real token, {label}: {value:.3f}")
    return lines


def json_line(summary: dict[tuple[str, str], SideSummary]) -> dict[str, float | None]:
    """The benchmark's last stdout line (JSON_KEYS). Start-up and peak RSS are the default
    (unpacked) runs' of finetune and TRL; `overhead_vs_reference` is ours / reference in
    tokens/s on the packed batches (1.0: no overhead)."""
    r = ratios(summary)

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    line = {
        "ours_tokens_per_s": _get(summary, ("ours", "unpacked"), "tokens_per_s"),
        "ours_packed_tokens_per_s": _get(summary, ("ours", "packed"), "tokens_per_s"),
        "reference_tokens_per_s": _get(summary, ("reference", "packed"), "tokens_per_s"),
        "trl_tokens_per_s": _get(summary, ("trl", "unpacked"), "tokens_per_s"),
        "trl_packed_tokens_per_s": _get(summary, ("trl", "packed"), "tokens_per_s"),
        "overhead_vs_reference": r["overhead_vs_reference"],
        "speedup_vs_trl": r["speedup_vs_trl"],
        "speedup_vs_trl_packed": r["speedup_vs_trl_packed"],
        "startup_s": _get(summary, ("ours", "unpacked"), "startup_s"),
        "trl_startup_s": _get(summary, ("trl", "unpacked"), "startup_s"),
        "peak_rss_mb": _get(summary, ("ours", "unpacked"), "peak_rss_mb"),
        "trl_peak_rss_mb": _get(summary, ("trl", "unpacked"), "peak_rss_mb"),
    }
    digits = {"overhead_vs_reference": 4, "speedup_vs_trl": 4, "speedup_vs_trl_packed": 4}
    return {k: rounded(v, digits.get(k, 1)) for k, v in line.items()}


def targets(summary: dict[tuple[str, str], SideSummary], size: str) -> list[Target]:
    """The targets of `size` (TARGETS; sizes without their own use medium's): speed ratios,
    peak RSS and start-up against TRL in the same mode."""
    vs_reference, vs_trl_packed, vs_trl = TARGETS.get(size, TARGETS["medium"])
    r = ratios(summary)
    found = [
        Target("ours / reference, packed batches (tokens/s)", r["overhead_vs_reference"],
               vs_reference),
        Target("ours packed / TRL packed (tokens/s)", r["speedup_vs_trl_packed"], vs_trl_packed),
        Target("ours unpacked / TRL defaults (tokens/s)", r["speedup_vs_trl"], vs_trl),
    ]
    if r["overhead_vs_reference_unpacked"] is not None:
        found.insert(1, Target("ours / reference, unpacked batches (tokens/s)",
                               r["overhead_vs_reference_unpacked"], vs_reference))
    for mode, label in (("packed", "packed"), ("unpacked", "unpacked vs TRL defaults")):
        ours, trl = summary.get(("ours", mode)), summary.get(("trl", mode))
        if ours is None or trl is None:
            continue
        found.append(Target(f"peak RSS ours / TRL, {label}",
                            ours.peak_rss_mb / trl.peak_rss_mb, 1.0, higher_is_better=False))
        found.append(Target(f"start-up to first step ours / TRL, {label}",
                            paired_ratio(summary, ("ours", mode), ("trl", mode), index=1), 1.0,
                            higher_is_better=False))
    return found


def markdown_table(summary: dict[tuple[str, str], SideSummary]) -> str:
    """One row per side, in SIDE_NAMES order."""
    lines = ["| side | real tokens/s (median) | runs (tokens/s) | start-up to step 1 (s) | "
             "peak RSS (MB) | CPU s / 1k tokens | batch fill | train loss at equal tokens |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for side, name in SIDE_NAMES.items():
        s = summary.get(side)
        if s is None:
            continue
        runs = ", ".join(f"{s.by_rep[rep][0]:,.0f}" for rep in sorted(s.by_rep))
        cpu = f"{s.cpu_s_per_ktok:.2f}" if s.cpu_s_per_ktok is not None else "n/a"
        loss = f"{s.loss_at_budget:.4f}" if s.loss_at_budget is not None else "n/a"
        fill = f"{s.fill:.0%}" if s.fill is not None else "n/a"
        lines.append(f"| {name} | {s.tokens_per_s:,.0f} | {runs} | {s.startup_s:.1f} | "
                     f"{s.peak_rss_mb:,.0f} | {cpu} | {fill} | {loss} |")
    return "\n".join(lines)


def replace_section(doc: str, label: str, section: str) -> str:
    """`doc` with the section between the `<!-- bench:LABEL -->` and `<!-- /bench:LABEL -->`
    markers replaced by `section` (appended at the end, with its markers, if it is new)."""
    begin, end = f"<!-- bench:{label} -->", f"<!-- /bench:{label} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc, count=1)
    return doc.rstrip("\n") + "\n\n" + block + "\n"
