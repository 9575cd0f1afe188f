"""kernels.autotune: the measured winner is chosen among candidates that pass their self-check,
within noise the table's order stands, the cache spares a second run any timing, every rank
chooses what rank 0 measured, and autotune=off leaves the plan as the table made it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from finetune.config.kernels import Autotune, KernelsConfig
from finetune.kernels import AttentionCandidate, ModelFacts, default_registries, plan
from finetune.kernels.autotune import (
    MeasuringTuner,
    ReplayTuner,
    Timing,
    auto_decision,
    cache_path,
    load_tuning,
    matmul_rates,
    pick,
    time_workload,
)
from finetune.kernels.sdpa import sdpa_forward
from finetune.kernels.tuned_plan import plan_with_autotune
from finetune.kernels.workloads import TuningShapes, document_rows, workload

FACTS = ModelFacts(num_heads=4, num_kv_heads=2, head_dim=16)
SHAPES = TuningShapes(4, 2, 16, "fp32", ((32, 32), (64,)), True, hidden=32, lora_rank=4,
                      trainable=((4, 32), (32, 4)))
RATES = {"bf16": 0.5, "fp32": 1.0}


def ms(median: float, spread: float = 0.0) -> Timing:
    return Timing(median, median - spread, median + spread)



@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    return tmp_path


def _fast_wrong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return sdpa_forward(q, k, v, scale, causal=False)  # attends to the future: fails the check


def _registries_with_broken():
    registries = default_registries()
    registries.attention.register(AttentionCandidate(
        "broken", lambda p, f: (True, "claims to work everywhere"), default_rank=99,
        forward=_fast_wrong))
    return registries


def test_pick_takes_the_fastest_and_says_it_overturns_the_table() -> None:
    chosen, why = pick(["a", "b", "c"], {"a": ms(10), "b": ms(4), "c": ms(6)})
    assert chosen == "b"
    assert "overturns" in why and "10 ms" in why


def test_within_noise_the_table_order_stands() -> None:
    assert pick(["a", "b"], {"a": ms(10.3), "b": ms(10.0)})[0] == "a"  # 3% apart
    assert pick(["a", "b"], {"a": ms(12, 2), "b": ms(10, 1)})[0] == "a"  # spreads overlap
    assert pick(["a", "b"], {"a": ms(12, 0.5), "b": ms(10, 0.5)})[0] == "b"
    assert pick(["a", "b"], {"b": ms(1)})[0] == "b"  # a was not timed


def test_fastest_passing_candidate_wins_in_the_plan(cpu_profile) -> None:
    tuner = ReplayTuner({"attention": {"sdpa_varlen": ms(9), "sdpa": ms(3), "eager": ms(6)},
                         "optimizer": {"adamw": ms(1), "adamw_fused": ms(5),
                                       "adamw_foreach": ms(5)}})
    kernel_plan = plan(cpu_profile, KernelsConfig(), FACTS, tuner=tuner)
    attention = kernel_plan.kernels["attention"]
    assert attention.choice == "sdpa"
    assert attention.details["measured_ms"] == {"sdpa_varlen": 9, "sdpa": 3, "eager": 6}
    assert "overturns the table" in attention.reason
    rejected = {r.name: r.reason for r in attention.rejected}
    assert "measured 9 ms vs sdpa 3 ms" in rejected["sdpa_varlen"]
    assert kernel_plan.optimizer == "adamw"
    json.dumps(kernel_plan.to_dict())  # kernel_plan.json carries the measurements


def test_failing_selfcheck_is_never_chosen_however_fast(cpu_profile) -> None:
    asked = []

    class Recording(ReplayTuner):
        def timings(self, family, candidates):
            asked.append((family, [c.name for c in candidates]))
            return super().timings(family, candidates)

    tuner = Recording({"attention": {"broken": ms(0.001), "sdpa": ms(5), "sdpa_varlen": ms(4),
                                     "eager": ms(8)}})
    kernel_plan = plan(cpu_profile, KernelsConfig(), FACTS, registries=_registries_with_broken(),
                       tuner=tuner)
    assert kernel_plan.choice("attention") == "sdpa_varlen"
    assert "broken" not in dict(asked)["attention"]
    rejected = {r.name: r.reason for r in kernel_plan.kernels["attention"].rejected}
    assert rejected["broken"].startswith("self-check failed")


def test_explicit_choice_is_not_tuned(cpu_profile) -> None:
    tuner = ReplayTuner({"attention": {"sdpa": ms(1), "eager": ms(9)}})
    kernel_plan = plan(cpu_profile, KernelsConfig(attention="eager"), FACTS, tuner=tuner)
    assert kernel_plan.choice("attention") == "eager"


def _plan(profile, mode="on", **kwargs):
    cfg = KernelsConfig(autotune=Autotune(mode))
    table = plan(profile, KernelsConfig(), FACTS)
    return plan_with_autotune(profile, cfg, FACTS, packing=False,
                              shapes=kwargs.pop("shapes", SHAPES), device="cpu",
                              table_plan=table, run_seconds=kwargs.pop("run_seconds",
                                                                       lambda rates: None),
                              measure_matmul=kwargs.pop("measure_matmul", lambda d: RATES),
                              **kwargs)


def test_cache_hits_on_the_second_run(cpu_profile, cache) -> None:
    calls = []

    def measure(family, candidate):
        calls.append((family, candidate.name))
        return ms({"sdpa": 2.0, "eager": 1.0}.get(candidate.name, 5.0))

    first = _plan(cpu_profile, measure=measure)
    assert first.choice("attention") == "eager"
    assert first.autotune["cache"] == "measured" and calls
    calls.clear()
    matmul_calls = []
    second = _plan(cpu_profile, measure=measure,
                   measure_matmul=lambda d: matmul_calls.append(d) or RATES)
    assert calls == [] and matmul_calls == []
    assert second.autotune["cache"] == "hit" and second.autotune["matmul_cache"] == "hit"
    assert second.choice("attention") == "eager"
    assert list(cache.glob("autotune/*.tmp*")) == []


def test_corrupted_cache_warns_and_measures_again(cpu_profile, cache, caplog) -> None:
    path = cache_path(cpu_profile, SHAPES)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    cache_path(cpu_profile, None).write_text('{"tflops": "fast"}')
    calls = []
    kernel_plan = _plan(cpu_profile, measure=lambda f, c: calls.append(c.name) or ms(1))
    assert calls and "unreadable" in caplog.text
    assert kernel_plan.autotune["matmul_tflops"] == RATES
    assert load_tuning(path) is not None  # rewritten whole


def test_ranks_agree_on_rank_zeros_measurement(cpu_profile, cache) -> None:
    sent = []

    def rank0_broadcast(box):
        sent.append(box[0])

    def measure(family, candidate):
        return ms({"sdpa": 1.0}.get(candidate.name, 5.0))

    leader = _plan(cpu_profile, broadcast=rank0_broadcast, measure=measure)

    def other_rank_broadcast(box):
        box[0] = sent[0]

    def must_not_measure(family, candidate):
        raise AssertionError("only rank 0 measures")

    follower = _plan(cpu_profile, rank=1, local_rank=1, broadcast=other_rank_broadcast,
                     measure=must_not_measure,
                     measure_matmul=lambda d: pytest.fail("only rank 0 measures"))
    assert leader.choice("attention") == follower.choice("attention") == "sdpa"
    assert leader.kernels["attention"].to_dict() == follower.kernels["attention"].to_dict()


def test_off_and_tiny_runs_leave_the_table_plan_unchanged(cpu_profile, cache) -> None:
    table = plan(cpu_profile, KernelsConfig(), FACTS)
    off = _plan(cpu_profile, mode="off", measure=lambda f, c: pytest.fail("off measures"),
                measure_matmul=lambda d: pytest.fail("off measures"))
    assert off.kernels == table.kernels and off.autotune["tuned"] is False
    tiny = _plan(cpu_profile, mode="auto", run_seconds=lambda rates: 3.0,
                 measure=lambda f, c: pytest.fail("a tiny run is not tuned"),
                 shapes=lambda: pytest.fail("a tiny run reads no data for its shapes"))
    assert tiny.kernels == table.kernels
    assert tiny.autotune["tuned"] is False and tiny.autotune["matmul_tflops"] == RATES


def test_table_choice_measured_fastest_gives_the_same_plan(cpu_profile, cache) -> None:
    table = plan(cpu_profile, KernelsConfig(), FACTS)
    first = {"attention": table.choice("attention"), "optimizer": table.optimizer,
             "lora": table.lora}
    tuned = _plan(cpu_profile, measure=lambda f, c: ms(1.0 if c.name == first.get(f) else 9.0))
    for family in ("attention", "optimizer", "lora", "precision", "fused_ops"):
        assert tuned.choice(family) == table.choice(family)
    assert tuned.attn_implementation == table.attn_implementation


def test_auto_decision() -> None:
    assert auto_decision("auto", run_seconds=10.0, kind="cpu")[0] is False
    assert auto_decision("auto", run_seconds=3600.0, kind="cpu")[0] is True
    assert auto_decision("auto", run_seconds=None, kind="cpu")[0] is True
    assert auto_decision("on", run_seconds=1.0, kind="cpu")[0] is True
    assert auto_decision("off", run_seconds=None, kind="cpu")[0] is False
    assert auto_decision("auto", run_seconds=3600.0, kind="cpu", under_test=True)[0] is False
    assert auto_decision("on", run_seconds=None, kind="cpu", under_test=True)[0] is True


def test_matmul_rate_is_measured_once_and_cached(cpu_profile, cache) -> None:
    calls = []
    rates, cached = matmul_rates(cpu_profile, "cpu", measure=lambda d: calls.append(d) or RATES)
    again, cached_again = matmul_rates(cpu_profile, "cpu", measure=lambda d: pytest.fail("x"))
    assert (rates, cached, again, cached_again) == (RATES, False, RATES, True)
    assert calls == ["cpu"]


def test_a_cache_missing_one_dtypes_rate_is_measured_again(cpu_profile, cache) -> None:
    path = cache_path(cpu_profile, None)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"tflops": {"bf16": 0.5}}))  # no fp32 rate: an older or cut file
    calls = []
    rates, cached = matmul_rates(cpu_profile, "cpu", measure=lambda d: calls.append(d) or RATES)
    assert (rates, cached, calls) == (RATES, False, ["cpu"])
    assert json.loads(path.read_text())["tflops"] == RATES


def test_each_workload_shape_has_its_own_cache_file(cpu_profile) -> None:
    """Timings measured at one model's shapes are never read back for another's."""
    other = replace(SHAPES, hidden=64)
    assert cache_path(cpu_profile, SHAPES) == cache_path(cpu_profile, SHAPES)
    assert cache_path(cpu_profile, SHAPES) != cache_path(cpu_profile, other)
    assert cache_path(cpu_profile, None) not in (cache_path(cpu_profile, SHAPES),
                                                 cache_path(cpu_profile, other))


def test_time_workload_takes_the_median_after_warmup() -> None:
    ticks = iter([0, 5, 5, 5,  # two warm-up runs, 5 s and 0 s (not counted)
                  10, 10.001, 20, 20.003, 30, 30.002, 40, 40.010, 50, 50.002])
    timing = time_workload(lambda: None, sync=lambda: None, clock=lambda: next(ticks))
    assert timing.median_ms == pytest.approx(2.0)
    # quartiles of 1, 2, 2, 3, 10 ms: the one slow outlier does not widen the spread
    assert timing.low_ms == pytest.approx(2.0) and timing.high_ms == pytest.approx(3.0)
    ticks = iter([0, 0.5, 0.5, 1.0, 2, 2.3, 3, 3.1, 4, 4.2])  # slow steps: three repetitions
    timing = time_workload(lambda: None, sync=lambda: None, clock=lambda: next(ticks))
    assert (timing.low_ms, timing.median_ms) == (pytest.approx(100), pytest.approx(200))
    assert timing.high_ms == pytest.approx(300)


@pytest.mark.parametrize("family", ["attention", "lora", "optimizer"])
def test_every_cpu_workload_runs(cpu_profile, family) -> None:
    registry = getattr(default_registries(), family)
    names = {"attention": ["sdpa", "sdpa_varlen", "eager"], "lora": ["fused", "peft"],
             "optimizer": ["adamw", "adamw_foreach", "adamw_fused"]}[family]
    for name in names:
        for shapes in (SHAPES, replace(SHAPES, packing=False, rows=((40,), (64,)))):
            step = workload(family, registry.get(name), shapes, "cpu")
            assert step is not None, name
            step()
            step()


def test_document_rows_follow_the_distribution() -> None:
    packed = document_rows(256, 2, 64, packing=True)
    assert all(sum(row) == 256 for row in packed) and len(packed[0]) > 1
    whole = document_rows(256, 4, 256, packing=False)
    assert all(len(row) == 1 and row[0] <= 256 for row in whole)
    capped = document_rows(512, 8, 512, packing=False)
    assert sum(map(sum, capped)) <= 1024 and len(capped) >= 1


def test_measuring_tuner_reuses_cached_family() -> None:
    tuner = MeasuringTuner(SHAPES, "cpu", cached={"lora": {"fused": ms(1), "peft": ms(2)}},
                           measure=lambda f, c: pytest.fail("cached"))
    lora = default_registries().lora
    assert tuner.timings("lora", list(lora)) == {"fused": ms(1), "peft": ms(2)}


def test_a_loss_head_candidate_is_timed_through_its_loss() -> None:
    from dataclasses import dataclass

    import torch.nn.functional as F

    from finetune.kernels.registry import Candidate

    calls = []

    def summed(hidden, weight, bias, targets, ignore_index):
        calls.append(tuple(hidden.shape))
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,
                               ignore_index=ignore_index, reduction="sum")

    @dataclass(frozen=True)
    class WithLoss(Candidate):
        loss: object = None

    candidate = WithLoss("chunked", lambda p, f: (True, ""), loss=summed)
    assert workload("fused_linear_cross_entropy", candidate, SHAPES, "cpu") is None  # no vocab
    step = workload("fused_linear_cross_entropy", candidate, replace(SHAPES, vocab=64), "cpu")
    assert step is not None
    step()
    assert calls == [(SHAPES.tokens, SHAPES.hidden)]


def test_a_varlen_package_is_timed_one_document_at_a_time() -> None:
    seen = []

    def forward(q, k, v, scale):
        seen.append(q.shape[2])
        return sdpa_forward(q, k, v, scale)

    candidate = AttentionCandidate("flash_like", lambda p, f: (True, ""), forward=forward,
                                   packing_isolation="varlen")
    step = workload("attention", candidate, SHAPES, "cpu")
    step()
    assert seen == [32, 32, 64]  # each document of each row, never across documents


def test_loss_heads_are_timed_but_the_unfused_one_never_replaces_them(cpu_profile) -> None:
    calls = []

    def measure(family, candidate):
        calls.append((family, candidate.name))
        return ms(0.1)

    tuner = MeasuringTuner(replace(SHAPES, vocab=64), "cpu", measure=measure)
    kernel_plan = plan(cpu_profile, KernelsConfig(), FACTS, tuner=tuner)
    assert ("fused_linear_cross_entropy", "unfused") not in calls
    assert kernel_plan.loss_head == "chunked"  # CPU: no Liger, and unfused is not timed
    regs = default_registries()
    regs.loss_head.register(replace(regs.loss_head.get("chunked"), name="chunked_fast",
                                    default_rank=0))
    tuned = plan(cpu_profile, KernelsConfig(), FACTS, registries=regs,
                 tuner=ReplayTuner({"fused_linear_cross_entropy": {"chunked_fast": ms(5),
                                                                   "chunked": ms(1)}}))
    details = tuned.kernels["fused_ops"].details
    assert details["loss_head"] == "chunked"
    assert details["loss_head_measured_ms"] == {"chunked_fast": 5, "chunked": 1}


def test_padded_rows_pay_for_their_padding_in_the_mlp(monkeypatch) -> None:
    """One MLP pass rides with the attention: over every padded position for the dense paths,
    over the real tokens only for the varlen ones."""
    from finetune.kernels import workloads

    carried = []
    real = workloads._mlp

    def recording(shapes, tokens, device):
        carried.append(tokens)
        return real(shapes, tokens, device)

    monkeypatch.setattr(workloads, "_mlp", recording)
    shapes = replace(SHAPES, packing=False, rows=((8,), (64,)), intermediate=64)
    registry = default_registries().attention
    for name in ("sdpa", "sdpa_varlen"):
        workload("attention", registry.get(name), shapes, "cpu")()
    assert carried == [128, 72]  # 2 rows padded to 64, against 8 + 64 real tokens
