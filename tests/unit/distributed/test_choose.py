"""distributed=auto picks single/ddp when the model fits, fsdp2 when it does not, offloads on
unified memory; explicit strategies are kept or refused with the fix."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import AutoConfig

from finetune.config.compose import compose_run_config
from finetune.config.distributed import DistributedConfig, Offload, Strategy
from finetune.config.schema import ModelConfig
from finetune.distributed.choose import (
    FIT_FRACTION,
    PUBLISHED_CONFIGS,
    choose_strategy,
    config_for_estimate,
    device_budget,
    workload_from_run,
)
from finetune.distributed.memory import GIB, Workload, model_shape
from finetune.errors import ConfigError
from finetune.hardware import profile_by_name
from finetune.kernels import ModelFacts, plan

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def _llama_8b(**kw) -> Workload:
    model_type, sizes = PUBLISHED_CONFIGS[LLAMA_8B]
    shape = model_shape(AutoConfig.for_model(model_type, **sizes))
    return Workload(shape=shape, **{"seq_len": 2048, "micro_batch_size": 1, **kw})


def _auto(**kw) -> DistributedConfig:
    return DistributedConfig(**kw)


def test_8b_lora_fits_one_80gb_gpu_as_single() -> None:
    h100 = profile_by_name("h100")
    choice = choose_strategy(_auto(), _llama_8b(peft_method="lora", micro_batch_size=2), h100, 1)
    assert (choice.strategy, choice.cpu_offload, choice.fits) == (Strategy.single, False, True)
    assert choice.estimate.total <= FIT_FRACTION * h100.memory_gb * GIB
    assert "LoRA r=16 on 8.0B params" in choice.reason and "within" in choice.reason


def test_8b_full_fine_tune_on_8_h100_needs_fsdp2() -> None:
    h100 = profile_by_name("h100")
    choice = choose_strategy(_auto(), _llama_8b(peft_method="none"), h100, 8)
    assert (choice.strategy, choice.cpu_offload, choice.fits) == (Strategy.fsdp2, False, True)
    ddp, fsdp = choice.estimates["ddp"], choice.estimates["fsdp2"]
    budget = FIT_FRACTION * h100.memory_gb * GIB
    assert ddp.total > budget >= fsdp.total
    assert choice.reason.startswith("full fine-tune of 8.0B params: ddp over 8 processes needs "
                                    f"about {ddp.total / GIB:.1f} GiB per device, more than 90% "
                                    "of the 79.1 GiB of NVIDIA H100 80GB HBM3; fsdp2 over 8 "
                                    f"processes needs about {fsdp.total / GIB:.1f} GiB")


def test_lora_on_several_gpus_stays_ddp() -> None:
    choice = choose_strategy(_auto(), _llama_8b(peft_method="lora"), profile_by_name("h100"), 8)
    assert (choice.strategy, list(choice.estimates)) == (Strategy.ddp, ["ddp"])


def test_not_fitting_even_fsdp2_says_what_to_try() -> None:
    workload = _llama_8b(peft_method="none", micro_batch_size=4)
    choice = choose_strategy(_auto(), workload, profile_by_name("v100"), 8)
    assert (choice.strategy, choice.cpu_offload, choice.fits) == (Strategy.fsdp2, False, False)
    assert "it will not fit; try trainer.gradient_checkpointing=true (about " in choice.reason
    ckpt = replace(workload, gradient_checkpointing=True).estimate("fsdp2", 8)
    assert f"checkpointing=true (about {ckpt.total / GIB:.1f} GiB)" in choice.reason
    for fix in ("trainer.micro_batch_size=1", "peft=lora", "distributed.cpu_offload=on",
                "--nproc"):
        assert fix in choice.reason


def test_unified_memory_offloads_when_fsdp2_is_short() -> None:
    workload = _llama_8b(peft_method="none", micro_batch_size=5)
    mi300a = profile_by_name("mi300a")
    assert mi300a.unified_memory
    budget = FIT_FRACTION * mi300a.memory_gb * GIB
    assert workload.estimate("fsdp2", 4).total > budget >= workload.estimate(
        "fsdp2", 4, cpu_offload=True).total
    choice = choose_strategy(_auto(), workload, mi300a, 4)
    assert (choice.strategy, choice.cpu_offload, choice.fits) == (Strategy.fsdp2, True, True)
    assert "shares its memory with the host" in choice.reason
    assert choice.estimate.host > 0
    # The same memory without unified memory: fsdp2 stays on the device and says it is short.
    discrete = choose_strategy(_auto(), workload, replace(mi300a, unified_memory=False), 4)
    assert (discrete.strategy, discrete.cpu_offload, discrete.fits) == (
        Strategy.fsdp2, False, False)
    # cpu_offload=off is honoured even there.
    off = choose_strategy(_auto(cpu_offload=Offload.off), workload, mi300a, 4)
    assert off.cpu_offload is False


def test_one_unified_device_offloads_a_model_that_does_not_fit() -> None:
    gh200 = profile_by_name("gh200")
    choice = choose_strategy(_auto(), _llama_8b(peft_method="none", gradient_checkpointing=True),
                             gh200, 1)
    assert (choice.strategy, choice.cpu_offload, choice.fits) == (Strategy.fsdp2, True, True)
    assert choice.estimates["single"].total > FIT_FRACTION * gh200.memory_gb * GIB


def test_cpu_offload_on_picks_fsdp2_and_is_refused_with_ddp() -> None:
    choice = choose_strategy(_auto(cpu_offload=Offload.on), _llama_8b(peft_method="lora"),
                             profile_by_name("h100"), 8)
    assert (choice.strategy, choice.cpu_offload) == (Strategy.fsdp2, True)
    with pytest.raises(ConfigError, match="cannot offload"):
        choose_strategy(_auto(strategy=Strategy.ddp, cpu_offload=Offload.on),
                        _llama_8b(), profile_by_name("h100"), 8)


@pytest.mark.parametrize(("strategy", "world", "fix"), [
    (Strategy.single, 2, "--nproc 1"),
    (Strategy.ddp, 1, "--nproc N"),
])
def test_explicit_strategy_with_the_wrong_process_count_is_refused(
        strategy: Strategy, world: int, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        choose_strategy(_auto(strategy=strategy), _llama_8b(), profile_by_name("h100"), world)


def test_explicit_strategy_is_kept_even_when_it_does_not_fit() -> None:
    choice = choose_strategy(_auto(strategy=Strategy.ddp), _llama_8b(peft_method="none"),
                             profile_by_name("h100"), 8)
    assert (choice.strategy, choice.fits) == (Strategy.ddp, False)
    assert "may run out of memory" in choice.reason and "distributed=fsdp2 (about" in choice.reason


def test_explicit_fsdp2_runs_on_one_process() -> None:
    choice = choose_strategy(_auto(strategy=Strategy.fsdp2), _llama_8b(peft_method="lora"),
                             profile_by_name("h100"), 1)
    assert (choice.strategy, choice.fits) == (Strategy.fsdp2, True)
    assert "nothing is sharded" in choice.reason


def test_processes_on_a_cpu_share_its_memory() -> None:
    cpu = profile_by_name("cpu")
    assert device_budget(cpu, 4) == device_budget(cpu, 1) // 4
    h100 = profile_by_name("h100")
    assert device_budget(h100, 8) == device_budget(h100, 1)


def test_unknown_device_memory_assumes_the_first_choice() -> None:
    profile = replace(profile_by_name("h100"), memory_gb=None)
    choice = choose_strategy(_auto(), _llama_8b(peft_method="none"), profile, 8)
    assert (choice.strategy, choice.fits) == (Strategy.ddp, None)
    assert "unknown" in choice.reason


def test_choice_to_dict_and_describe() -> None:
    choice = choose_strategy(_auto(), _llama_8b(peft_method="none"), profile_by_name("h100"), 8)
    data = choice.to_dict()
    assert data["strategy"] == "fsdp2" and set(data["considered"]) == {"ddp", "fsdp2"}
    assert data["estimate"]["bytes"]["total"] == choice.estimate.total
    assert choice.describe().startswith("distributed: fsdp2 (full fine-tune")


def test_workload_from_a_run_config() -> None:
    cfg = compose_run_config("dpo", ["peft=none", "trainer.micro_batch_size=3"])
    shape_config, _ = config_for_estimate(ModelConfig(name_or_path=LLAMA_8B))
    kernel_plan = plan(profile_by_name("h100"), cfg.kernels, ModelFacts(32, 8, 128))
    workload = workload_from_run(cfg, shape_config, kernel_plan, pairs=True)
    assert (workload.rows, workload.seq_len, workload.full) == (6, 2048, True)
    assert workload.reference_model  # a full DPO without precomputed reference log-probs
    assert workload.seq_len_from.startswith("data.max_seq_len=auto, assumed 2048")
    assert workload.compute_dtype == kernel_plan.compute_dtype
    fixed = workload_from_run(compose_run_config("lora_sft", ["data.max_seq_len=512"]),
                              shape_config, kernel_plan)
    assert (fixed.seq_len, fixed.reference_model, fixed.full) == (512, False, False)


def test_shipped_hub_models_are_estimated_offline() -> None:
    hf_config, source = config_for_estimate(ModelConfig(name_or_path=LLAMA_8B))
    assert model_shape(hf_config).params == 8_030_261_248
    assert source.startswith(LLAMA_8B)


def test_a_missing_model_folder_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such model folder"):
        config_for_estimate(ModelConfig(name_or_path=str(tmp_path / "absent")))
