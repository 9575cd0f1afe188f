"""Kernel autotuning: time the candidates that pass their self-check at the run's shapes, and
choose by measurement (`kernels.autotune=auto|on|off`).

The planner asks a `Tuner` for the timings of a family's passing candidates
(`Tuner.timings(family, candidates)`); `pick` then takes the fastest, but keeps the table's order
among candidates within noise (`NOISE`: medians less than 5% apart, or spreads that overlap).
`MeasuringTuner` runs each candidate's workload (finetune.kernels.workloads): warm-up first,
then the median of `repeats` forward + backward steps, and reads and writes the cache;
`ReplayTuner` hands back timings measured elsewhere (another rank's, a test's).

Cache: one JSON file per (device name, arch, runtime, torch, transformers and finetune
versions, installed kernel packages, shape signature) under `$FINETUNE_CACHE/autotune/`, else
`~/.cache/finetune/autotune/`; the device's measured matmul rate has a file of its own (no
shape in its key). Files are written whole (a temporary file, then os.replace) by one process
per node; an unreadable file is warned about and measured again, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from finetune import __version__
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate
from finetune.kernels.workloads import NOT_TIMED, TuningShapes, Workload, workload

logger = logging.getLogger(__name__)

NOISE = 0.05  # medians closer than this fraction of the faster one count as a tie
WARMUP = 2
REPEATS = 5
MIN_REPEATS = 3
# A candidate whose last warm-up step takes longer than this is timed MIN_REPEATS times, not
# `repeats` times: tuning has to stay within seconds even when a path is very slow.
SLOW_STEP_S = 0.2
MATMUL_SIZE = {"cpu": 1024, "gpu": 8192}
MATMUL_REPEATS = 3
CACHE_VERSION = 1
# What tuning is expected to cost when nothing is cached (seconds): `auto` tunes a run that
# is expected to last at least AUTO_FACTOR times as long.
TUNING_ESTIMATE_S = {"cpu": 6.0, "gpu": 3.0}
AUTO_FACTOR = 10


@dataclass(frozen=True)
class Timing:
    """One candidate's measurement, in ms: the median of its repetitions and their spread
    (lower and upper quartile from 4 repetitions on, else min and max)."""

    median_ms: float
    low_ms: float
    high_ms: float

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": round(self.median_ms, 4), "low_ms": round(self.low_ms, 4),
                "high_ms": round(self.high_ms, 4)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timing:
        return cls(float(data["median_ms"]), float(data["low_ms"]), float(data["high_ms"]))


def within_noise(a: Timing, b: Timing) -> bool:
    """True when `a` and `b` cannot be told apart: medians within NOISE of the faster one, or
    overlapping spreads (quartiles: one slow outlier on a busy machine does not count)."""
    fast, slow = sorted((a.median_ms, b.median_ms))
    overlap = a.low_ms <= b.high_ms and b.low_ms <= a.high_ms
    return slow - fast <= NOISE * fast or overlap


def pick(order: list[str], timings: Mapping[str, Timing]) -> tuple[str, str]:
    """The measured choice among `order` (the table's order, best first) and why.

    The fastest timed candidate wins unless a candidate ranked above it is within noise of it:
    then the highest-ranked of those stays. Candidates without a timing are passed over; with
    no timing at all the table's first stands."""
    timed = [name for name in order if name in timings]
    if not timed:
        return order[0], "not timed"
    fastest = min(timed, key=lambda n: timings[n].median_ms)
    best = timings[fastest]
    chosen = next(n for n in timed if n == fastest or within_noise(timings[n], best))
    first = timed[0]
    if chosen == fastest == first:
        return chosen, f"measured fastest ({best.median_ms:.3g} ms)"
    if chosen != fastest:
        return chosen, (f"measured {timings[chosen].median_ms:.3g} ms, within noise of the "
                        f"fastest {fastest} at {best.median_ms:.3g} ms: the table's order kept")
    return chosen, (f"measured {timings[chosen].median_ms:.3g} ms against the table's first "
                    f"{first} at {timings[first].median_ms:.3g} ms: the measurement overturns "
                    f"the table")


def synchronize(device: str) -> Callable[[], None]:
    """The device's synchronize (a no-op on the CPU), so a timing covers the work it queued."""
    kind = torch.device(device).type
    module = getattr(torch, kind, None)
    sync = getattr(module, "synchronize", None) if kind != "cpu" else None
    return sync or (lambda: None)


def time_workload(step: Workload, *, sync: Callable[[], None], warmup: int = WARMUP,
                  repeats: int = REPEATS, clock: Callable[[], float] = time.perf_counter
                  ) -> Timing:
    """Run `step` `warmup` times, then time `repeats` runs (fewer when one step is slower
    than SLOW_STEP_S: MIN_REPEATS); median and spread (`Timing`) in milliseconds."""
    first = 0.0
    for _ in range(warmup):
        start = clock()
        step()
        sync()
        first = clock() - start
    count = min(MIN_REPEATS, repeats) if first > SLOW_STEP_S else repeats
    times = []
    for _ in range(count):
        start = clock()
        step()
        sync()
        times.append((clock() - start) * 1e3)
    if len(times) >= 4:
        low, _, high = statistics.quantiles(times, n=4, method="inclusive")
        return Timing(statistics.median(times), low, high)
    return Timing(statistics.median(times), min(times), max(times))


class Tuner(Protocol):
    """What the planner asks: the timings of a family's passing candidates (names missing from
    the answer were not timed)."""

    def timings(self, family: str, candidates: list[Candidate]) -> dict[str, Timing]: ...


class ReplayTuner:
    """Timings measured elsewhere: {family: {candidate: Timing}}."""

    def __init__(self, measured: Mapping[str, Mapping[str, Timing]]) -> None:
        self.measured = {f: dict(t) for f, t in measured.items()}

    def timings(self, family: str, candidates: list[Candidate]) -> dict[str, Timing]:
        found = self.measured.get(family, {})
        return {c.name: found[c.name] for c in candidates if c.name in found}


class MeasuringTuner:
    """Times candidates on `device` at `shapes`; remembers what it measured in `measured`
    (`record()` gives it in the cache's form). `cached` (from `load_tuning`) answers without
    timing when it holds the family's candidates. `measure` replaces `time_workload` (tests)."""

    def __init__(self, shapes: TuningShapes, device: str, *,
                 cached: Mapping[str, Mapping[str, Timing]] | None = None,
                 measure: Callable[[str, Candidate], Timing | None] | None = None) -> None:
        self.shapes = shapes
        self.device = device
        self.cached = {f: dict(t) for f, t in (cached or {}).items()}
        self.measured: dict[str, dict[str, Timing]] = {}
        self.seconds = 0.0
        self._measure = measure or self._time

    def _time(self, family: str, candidate: Candidate) -> Timing | None:
        step = workload(family, candidate, self.shapes, self.device)
        if step is None:
            return None
        try:
            return time_workload(step, sync=synchronize(self.device))
        except Exception as exc:  # a candidate that cannot run this shape is not a choice
            logger.warning("autotune: %s %s failed to run at the run's shapes: %s", family,
                           candidate.name, exc)
            return None

    def timings(self, family: str, candidates: list[Candidate]) -> dict[str, Timing]:
        candidates = [c for c in candidates if (family, c.name) not in NOT_TIMED]
        if len(candidates) < 2:
            return {}
        names = [c.name for c in candidates]
        cached = self.cached.get(family, {})
        if cached and all(n in cached for n in names):
            self.measured[family] = {n: cached[n] for n in names}
            return dict(self.measured[family])
        started = time.perf_counter()
        found = {}
        for candidate in candidates:
            timing = self._measure(family, candidate)
            if timing is not None:
                found[candidate.name] = timing
        self.seconds += time.perf_counter() - started
        if found:
            logger.info("autotune: %s at %s: %s", family, self.shapes.describe(),
                        ", ".join(f"{n} {t.median_ms:.3g} ms" for n, t in found.items()))
        self.measured[family] = found
        return dict(found)


def measured_dict(measured: Mapping[str, Mapping[str, Timing]]) -> dict[str, dict[str, Any]]:
    """{family: {candidate: Timing}} in JSON form."""
    return {f: {n: t.to_dict() for n, t in found.items()} for f, found in measured.items()}


def measured_from_dict(data: Mapping[str, Any]) -> dict[str, dict[str, Timing]]:
    """The inverse of `measured_dict`."""
    return {f: {n: Timing.from_dict(t) for n, t in found.items()} for f, found in data.items()}


# ------------------------------------------------------------------ the matmul rate

def device_kind(device: str) -> str:
    """cpu | gpu: which budgets (MATMUL_SIZE, TUNING_ESTIMATE_S, MAX_TOKENS) apply."""
    return "cpu" if torch.device(device).type == "cpu" else "gpu"


def measure_matmul_tflops(device: str, dtype: torch.dtype, *, size: int | None = None,
                          repeats: int = MATMUL_REPEATS) -> float:
    """The device's dense matmul rate in TFLOP/s: a square `size` product (MATMUL_SIZE by
    default), one warm-up, then the median of `repeats`."""
    n = size or MATMUL_SIZE[device_kind(device)]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    timing = time_workload(lambda: a @ b, sync=synchronize(device), repeats=repeats)
    return 2 * n**3 / (timing.median_ms / 1e3) / 1e12


def measure_matmul_rates(device: str) -> dict[str, float]:
    """{"bf16": TFLOP/s, "fp32": TFLOP/s} measured on `device`."""
    return {name: round(measure_matmul_tflops(device, dtype), 4)
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


# ------------------------------------------------------------------ the cache

def cache_dir() -> Path:
    """$FINETUNE_CACHE/autotune, else ~/.cache/finetune/autotune."""
    env = os.environ.get("FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "finetune") / "autotune"


def device_key(profile: HardwareProfile) -> dict[str, Any]:
    """What a measurement depends on besides the shapes: the device, its runtime and driver,
    and the versions of the software that runs the kernels."""
    return {"name": profile.name, "arch": profile.arch, "runtime": profile.runtime,
            "cudnn": profile.cudnn, "torch": profile.torch, "transformers": profile.transformers,
            "finetune": __version__, "packages": sorted(profile.packages),
            "threads": torch.get_num_threads() if profile.vendor == "cpu" else None,
            "version": CACHE_VERSION}


def cache_path(profile: HardwareProfile, shapes: TuningShapes | None) -> Path:
    """The file for `profile` and `shapes` (None: the matmul rate's file)."""
    key = {**device_key(profile), "shapes": shapes.signature() if shapes else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    prefix = "matmul" if shapes is None else "kernels"
    return cache_dir() / f"{prefix}-{digest}.json"


def read_cache(path: Path) -> dict[str, Any] | None:
    """The cached JSON object at `path`; None when absent, and None with a warning when it
    cannot be read (it is then measured again and rewritten)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("autotune cache %s is unreadable (%s): measuring again", path, exc)
        return None
    if not isinstance(data, dict):
        logger.warning("autotune cache %s holds no JSON object: measuring again", path)
        return None
    return data


def write_cache(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, then os.replace);
    a failure to write is a warning (the run goes on, measuring again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("autotune cache %s not written: %s", path, exc)


def load_tuning(path: Path) -> dict[str, dict[str, Timing]] | None:
    """The timings cached at `path`, or None (absent, unreadable or malformed)."""
    data = read_cache(path)
    if data is None:
        return None
    try:
        return measured_from_dict(data["measured"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        logger.warning("autotune cache %s is malformed (%s): measuring again", path, exc)
        return None


def matmul_rates(profile: HardwareProfile, device: str, *, write: bool = True,
                 measure: Callable[[str], dict[str, float]] = measure_matmul_rates
                 ) -> tuple[dict[str, float], bool]:
    """(the device's measured matmul rates, whether they came from the cache); measured and
    cached (when `write`) on a miss."""
    path = cache_path(profile, None)
    data = read_cache(path)
    rates = data.get("tflops") if data else None
    if isinstance(rates, dict) and all(isinstance(rates.get(k), float) for k in ("bf16", "fp32")):
        return {k: rates[k] for k in ("bf16", "fp32")}, True
    rates = measure(device)
    if write:
        write_cache(path, {"device": device_key(profile), "tflops": rates})
    return rates, False


# ------------------------------------------------------------------ when to tune

def auto_decision(mode: str, *, run_seconds: float | None, kind: str,
                  under_test: bool = False) -> tuple[bool, str]:
    """Whether to tune, and why. `run_seconds`: the run's expected length (None: unknown, e.g.
    epochs over data not read yet); `under_test`: the run is part of a test session, where
    `auto` never tunes (a test's plan must not depend on how busy the machine is). A tuned run
    whose timings are cached times nothing (`MeasuringTuner`)."""
    if mode == "off":
        return False, "kernels.autotune=off"
    if mode == "on":
        return True, "kernels.autotune=on"
    if under_test:
        return False, "auto: not tuned in a test session (kernels.autotune=on tunes anyway)"
    estimate = TUNING_ESTIMATE_S[kind]
    if run_seconds is None:
        return True, "auto: the run's length is not known up front"
    if run_seconds >= AUTO_FACTOR * estimate:
        return True, (f"auto: the run is expected to take ~{run_seconds:.0f} s, over "
                      f"{AUTO_FACTOR}x the ~{estimate:.0f} s tuning costs")
    return False, (f"auto: the run is expected to take ~{run_seconds:.0f} s, under "
                   f"{AUTO_FACTOR}x the ~{estimate:.0f} s tuning would cost (kernels.autotune=on "
                   f"tunes anyway)")


def expected_run_seconds(flops_per_token: float | None, tokens: int | None,
                         tflops: float | None) -> float | None:
    """A run's expected compute time: its model FLOPs over the device's measured matmul rate
    (an optimistic bound: a real step also waits on memory and the data)."""
    if not flops_per_token or not tokens or not tflops:
        return None
    return flops_per_token * tokens / (tflops * 1e12)


def broadcast_object(value: Any, broadcast: Callable[[list[Any]], None] | None) -> Any:
    """`value` as rank 0 holds it, on every rank: `broadcast` fills a one-element list in
    place, as torch.distributed.broadcast_object_list(objects, src=0) does; None (one process)
    returns `value` unchanged."""
    if broadcast is None:
        return value
    box = [value]
    broadcast(box)
    return box[0]
