"""trainer.gradient_checkpointing=auto: off while the estimate fits the budget with its margin,
on otherwise, with the figures in the reason; true/false kept; other values refused; the CPU's
budget is the host memory available now plus what this process holds."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import AutoConfig

from finetune.config.compose import compose_run_config
from finetune.config.distributed import DistributedConfig, Strategy
from finetune.distributed.checkpointing import (
    Budget,
    choose_checkpointing,
    memory_budget,
    with_checkpointing,
)
from finetune.distributed.choose import FIT_FRACTION, PUBLISHED_CONFIGS, choose_strategy
from finetune.distributed.memory import GIB, Workload, format_bytes, model_shape
from finetune.errors import ConfigError
from finetune.hardware import profile_by_name

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def _strategy(seq_len: int, micro_batch_size: int = 1, profile: str = "h100"):
    model_type, sizes = PUBLISHED_CONFIGS[LLAMA_8B]
    workload = Workload(shape=model_shape(AutoConfig.for_model(model_type, **sizes)),
                        peft_method="lora", seq_len=seq_len, micro_batch_size=micro_batch_size)
    return choose_strategy(DistributedConfig(), workload, profile_by_name(profile), 1)


def test_auto_stays_off_when_the_run_fits_and_says_the_figures() -> None:
    strategy = _strategy(2048)
    budget = Budget(80 * GIB, "the 80.0 GiB of a test GPU")
    choice = choose_checkpointing("auto", strategy, budget)
    total = strategy.estimate.total
    assert total <= FIT_FRACTION * budget.bytes
    assert not choice.enabled
    assert choice.headline() == (
        f"gradient checkpointing: off (auto: without it single needs about "
        f"{format_bytes(total)} per process for micro-batches of 1 x 2048 tokens, within 90% "
        "of the 80.0 GiB of a test GPU)")


def test_auto_turns_on_when_the_run_does_not_fit_and_gives_both_figures() -> None:
    strategy = _strategy(16384, micro_batch_size=4)
    without = strategy.estimate.total
    with_it = replace(strategy.workload, gradient_checkpointing=True).estimate("single").total
    # A budget between the two estimates: only checkpointing makes the run fit.
    budget = Budget(int((with_it + without) / 2 / FIT_FRACTION), "the test budget")
    choice = choose_checkpointing("auto", strategy, budget)
    assert choice.enabled
    assert (f"without it single needs about {format_bytes(without)} per process" in choice.reason
            and "more than 90% of the test budget" in choice.reason
            and choice.reason.endswith(f"with it about {format_bytes(with_it)}"))
    # A budget too small even with checkpointing says so.
    tiny = choose_checkpointing("auto", strategy, Budget(with_it // 2, "half of it"))
    assert tiny.enabled and tiny.reason.endswith("still more: see the distributed line")


def test_auto_with_an_unknown_budget_stays_off_and_names_the_setting() -> None:
    choice = choose_checkpointing("auto", _strategy(2048), Budget(None, "unknown"))
    assert not choice.enabled and "trainer.gradient_checkpointing=true" in choice.reason


@pytest.mark.parametrize("setting", [True, False])
def test_true_and_false_are_kept_whatever_the_memory(setting: bool) -> None:
    roomy, cramped = Budget(10**15, "a lot"), Budget(1, "nothing")
    for budget in (roomy, cramped):
        choice = choose_checkpointing(setting, _strategy(16384, 4), budget)
        assert choice.enabled is setting
        assert choice.reason == f"trainer.gradient_checkpointing={str(setting).lower()}"


def test_turning_on_remakes_the_strategy_estimate_with_checkpointing() -> None:
    strategy = _strategy(16384, micro_batch_size=4)
    h100 = profile_by_name("h100")
    choice, settled = with_checkpointing("auto", strategy, DistributedConfig(), h100, 1,
                                         budget=Budget(80 * GIB, "80 GiB"))
    assert choice.enabled
    assert settled.strategy == Strategy.single and settled.estimate.gradient_checkpointing
    assert settled.estimate.total < strategy.estimate.total
    assert "as configured" not in settled.reason
    assert settled.reason.endswith("with gradient checkpointing")
    off, same = with_checkpointing(False, strategy, DistributedConfig(), h100, 1,
                                   budget=Budget(80 * GIB, "80 GiB"))
    assert not off.enabled and same is strategy


def test_the_cpu_budget_is_the_available_host_memory_plus_this_process() -> None:
    cpu = profile_by_name("cpu")
    budget = memory_budget(cpu, host_available=8 * GIB, own_rss=GIB)
    assert budget.bytes == 9 * GIB
    assert budget.source == ("the 8.0 GiB of host memory available now plus the 1.0 GiB this "
                             "process holds")
    assert memory_budget(cpu, 2, host_available=8 * GIB, own_rss=GIB).bytes == 5 * GIB
    # A GPU's is its memory, whatever the host has.
    h100 = profile_by_name("h100")
    assert memory_budget(h100, host_available=1, own_rss=1).bytes == int(h100.memory_gb * GIB)


def test_auto_is_the_default_and_other_values_are_refused_with_the_fix() -> None:
    assert compose_run_config("lora_sft", []).trainer.gradient_checkpointing == "auto"
    assert compose_run_config(
        "lora_sft", ["trainer.gradient_checkpointing=true"]).trainer.gradient_checkpointing is True
    for bad in ("maybe", "1", "on"):
        with pytest.raises(ConfigError) as err:
            compose_run_config("lora_sft", [f"trainer.gradient_checkpointing={bad}"])
        assert "trainer.gradient_checkpointing=" in str(err.value)
        assert "must be auto" in str(err.value) and "true or false" in str(err.value)


@pytest.mark.parametrize(("share", "enabled"), [(0.85, False), (0.95, True)])
def test_the_margin_is_ninety_percent_of_the_budget_not_all_of_it(share: float,
                                                                  enabled: bool) -> None:
    # The estimate without checkpointing at 85% and at 95% of the budget: both fit the budget
    # itself, only the first fits its 90%.
    strategy = _strategy(2048)
    without = strategy.estimate.total
    choice = choose_checkpointing("auto", strategy, Budget(int(without / share), "the budget"))
    assert choice.enabled is enabled


def test_auto_weighs_the_estimate_of_the_runs_own_strategy_and_world_size() -> None:
    # fsdp2 over 4 processes shards what single keeps whole: the figure compared is fsdp2's.
    model_type, sizes = PUBLISHED_CONFIGS[LLAMA_8B]
    workload = Workload(shape=model_shape(AutoConfig.for_model(model_type, **sizes)),
                        peft_method="full", seq_len=2048, micro_batch_size=1)
    strategy = choose_strategy(DistributedConfig(strategy=Strategy.fsdp2), workload,
                               profile_by_name("h100"), 4)
    fsdp2 = workload.estimate("fsdp2", 4).total
    single = workload.estimate("single", 1).total
    # A budget that fsdp2's estimate fits with its margin and single's does not.
    budget = Budget(int(fsdp2 / 0.8), "the budget")
    assert fsdp2 <= FIT_FRACTION * budget.bytes < single
    choice = choose_checkpointing("auto", strategy, budget)
    assert not choice.enabled
    assert f"without it fsdp2 needs about {format_bytes(fsdp2)} per process" in choice.reason


def test_a_gpu_shared_by_more_processes_than_devices_is_split_between_them() -> None:
    h100 = profile_by_name("h100")  # 8 devices
    whole = int(h100.memory_gb * GIB)
    assert memory_budget(h100, 8).bytes == whole
    assert memory_budget(h100, 16).bytes == whole // 2


def test_the_budget_is_split_between_the_processes_on_this_machine_not_the_world() -> None:
    # ddp over 2 nodes of 8 H100s: 16 processes, 8 here, one whole GPU each. About 48 GiB
    # without checkpointing fits 90% of a whole H100, not 90% of half of one.
    model_type, sizes = PUBLISHED_CONFIGS[LLAMA_8B]
    workload = Workload(shape=model_shape(AutoConfig.for_model(model_type, **sizes)),
                        peft_method="lora", seq_len=4096, micro_batch_size=1)
    h100, ddp = profile_by_name("h100"), DistributedConfig(strategy=Strategy.ddp)
    strategy = choose_strategy(ddp, workload, h100, 16, local_processes=8)
    half = h100.memory_gb * GIB / 2
    assert FIT_FRACTION * half < strategy.estimate.total <= FIT_FRACTION * 2 * half
    two_nodes, _ = with_checkpointing("auto", strategy, ddp, h100, 16, local_processes=8)
    assert not two_nodes.enabled
    # The same 16 processes all on this machine share its 8 GPUs, two to a GPU.
    one_node, _ = with_checkpointing("auto", strategy, ddp, h100, 16)
    assert one_node.enabled
