"""`plan_with_autotune`: the kernel plan with `kernels.autotune` applied, one decision for all
ranks.

Rank 0 reads the device's matmul rate (measured once, cached), decides whether to time
candidates (`autotune.auto_decision`), re-plans with a `MeasuringTuner` when it does (cached
timings are used without timing anything) and broadcasts what it found; every other rank
re-plans with the same timings (`ReplayTuner`), so all ranks choose the same candidates while
each still self-checks its own device. The first process of each node writes the cache.
`kernels.autotune=off` returns the table's plan untouched and measures nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from finetune.config.kernels import KernelsConfig
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.autotune import (
    MeasuringTuner,
    ReplayTuner,
    Timing,
    auto_decision,
    broadcast_object,
    cache_dir,
    cache_path,
    device_kind,
    load_tuning,
    matmul_rates,
    measured_dict,
    measured_from_dict,
    read_cache,
    write_cache,
)
from finetune.kernels.kernel_plan import KernelPlan
from finetune.kernels.planner import plan
from finetune.kernels.registry import ModelFacts
from finetune.kernels.workloads import TuningShapes

Broadcast = Callable[[list[Any]], None]
# The run's expected seconds from the measured matmul rates (None: unknown).
RunSeconds = Callable[[Mapping[str, float]], float | None]


def _decide(profile: HardwareProfile, cfg: KernelsConfig, facts: ModelFacts | None, *,
            packing: bool, shapes: TuningShapes | Callable[[], TuningShapes], device: str,
            run_seconds: RunSeconds, write: bool,
            measure: Callable[[str, Any], Timing | None] | None,
            measure_matmul: Callable[[str], dict[str, float]] | None,
            under_test: bool) -> dict[str, Any]:
    """Rank 0's part: the matmul rate, whether to tune, and the timings."""
    started = time.perf_counter()
    kwargs = {"measure": measure_matmul} if measure_matmul else {}
    rates, rates_cached = matmul_rates(profile, device, write=write, **kwargs)
    mode = str(cfg.autotune)
    decision: dict[str, Any] = {
        "mode": mode, "matmul_tflops": rates,
        "matmul_cache": "hit" if rates_cached else "measured", "measured": {},
    }
    tune, why = auto_decision(mode, run_seconds=run_seconds(rates), kind=device_kind(device),
                              under_test=under_test)
    decision.update(tuned=tune, why=why)
    if not tune:  # decided without the shapes: no data is read for them
        decision["seconds"] = round(time.perf_counter() - started, 3)
        return decision
    shapes = shapes() if callable(shapes) else shapes
    path = cache_path(profile, shapes)
    cached = load_tuning(path)
    decision.update(shapes=shapes.describe(), cache_file=path.name)
    tuner = MeasuringTuner(shapes, device, cached=cached, measure=measure)
    plan(profile, cfg, facts, packing=packing, tuner=tuner)
    decision["measured"] = measured_dict(tuner.measured)
    decision["cache"] = "hit" if cached is not None and not tuner.seconds else "measured"
    if write and decision["cache"] == "measured":
        write_cache(path, {"shapes": shapes.describe(), "measured": decision["measured"]})
    decision["seconds"] = round(time.perf_counter() - started, 3)
    return decision


def plan_with_autotune(profile: HardwareProfile, cfg: KernelsConfig,
                       model_facts: ModelFacts | None, *, packing: bool,
                       shapes: TuningShapes | Callable[[], TuningShapes],
                       device: str, table_plan: KernelPlan, run_seconds: RunSeconds,
                       rank: int = 0, local_rank: int = 0, broadcast: Broadcast | None = None,
                       measure: Callable[[str, Any], Timing | None] | None = None,
                       measure_matmul: Callable[[str], dict[str, float]] | None = None,
                       under_test: bool = False) -> KernelPlan:
    """`table_plan` (made by `plan` without a tuner) with kernels.autotune applied.

    Args:
        shapes: what candidates are timed at (the run's shapes), or a function giving them,
            called on rank 0 only and only when they are needed (it may read the data).
        device: the torch device to time on ("cpu", "cuda:0", ...).
        run_seconds: the run's expected length from the measured matmul rates
            ({"bf16": TFLOP/s, "fp32": ...}); None when unknown.
        rank, local_rank: this process's ranks; rank 0 decides, local rank 0 writes the cache.
        broadcast: fills a one-element list with rank 0's object on every rank
            (torch.distributed.broadcast_object_list with src=0); None for one process.
        measure, measure_matmul: replace the timing of a candidate (family, candidate) and of
            the matmul rate (device) -- for tests.
        under_test: a test session's run: `auto` measures the matmul rate but times no
            candidate (`autotune.auto_decision`).
    Returns the plan every rank shares; its `autotune` holds the outcome (kernel_plan.json).
    """
    if str(cfg.autotune) == "off":
        return replace(table_plan, autotune={"mode": "off", "tuned": False,
                                             "why": "kernels.autotune=off"})
    decision = None
    if rank == 0:
        decision = _decide(profile, cfg, model_facts, packing=packing, shapes=shapes,
                           device=device, run_seconds=run_seconds, write=local_rank == 0,
                           measure=measure, measure_matmul=measure_matmul,
                           under_test=under_test)
    decision = broadcast_object(decision, broadcast)
    assert decision is not None
    if rank != 0 and local_rank == 0:
        _write_node_cache(profile, decision)
    result = table_plan
    if decision["tuned"]:
        replay = ReplayTuner(measured_from_dict(decision["measured"]))
        result = plan(profile, cfg, model_facts, packing=packing, tuner=replay)
    outcome = {k: v for k, v in decision.items() if k != "measured"}
    return replace(result, autotune=outcome)


def _write_node_cache(profile: HardwareProfile, decision: Mapping[str, Any]) -> None:
    """On another node's first process: keep rank 0's measurements in this node's cache."""
    path = cache_path(profile, None)
    if read_cache(path) is None:
        write_cache(path, {"tflops": decision["matmul_tflops"]})
    timings = cache_dir() / decision["cache_file"] if decision.get("cache_file") else None
    if decision["tuned"] and timings is not None and load_tuning(timings) is None:
        write_cache(timings, {"shapes": decision["shapes"], "measured": decision["measured"]})
