"""`finetune env`: plan display, JSON, table, overrides and exit codes."""

from __future__ import annotations

import json

import pytest

from finetune.commands.env import main, parse_kernel_overrides
from finetune.kernels.table import markdown_kernel_table


def test_impossible_override_exits_2_with_one_paragraph(capsys) -> None:
    assert main(["--profile", "t4", "kernels.attention=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "kernels.attention=flash_attention_2 is not possible here" in err
    assert "one of: sdpa, sdpa_varlen, eager" in err
    assert "\n" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kernels.atention=sdpa"], "Did you mean kernels.attention?"),
        (["kernels.attention=flash"], "use one of: auto, flash_attention_3"),
        (["kernels.selfcheck=maybe"], "true or false"),
        (["attention=sdpa"], "kernels.KEY=VALUE"),
        (["--profile", "h1000"], "valid profiles"),
        (["--profile", "cpu", "kernels.precision=bf16"], "AMX-BF16"),
    ],
)
def test_bad_input_exits_2(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_option_exits_2(capsys) -> None:
    assert main(["--assume-packages", "some"]) == 2


def test_help_exits_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--profile" in capsys.readouterr().out


def test_json_for_a_simulated_profile(capsys) -> None:
    assert main(["--profile", "h100", "--assume-packages", "all", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hardware"]["arch"] == "sm_90"
    assert data["kernels"]["attention"]["choice"] == "flash_attention_3"
    assert data["kernels"]["attention"]["selfcheck"] == "not run (simulated profile)"


def test_simulated_profile_assumes_no_packages_by_default(capsys) -> None:
    assert main(["--profile", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hardware"]["packages"] == ["triton"]  # shipped with GPU builds of torch
    attention = data["kernels"]["attention"]
    # No flash-attn-3: cuDNN attention, which ships in torch, leads on Hopper.
    assert (attention["choice"], attention["attn_implementation"]) == ("sdpa_cudnn", "sdpa")
    rejected = {r["name"]: r["reason"] for r in attention["rejected"]}
    assert rejected["flash_attention_3"].startswith("needs the flash-attn-3 package")


def test_packages_are_named_by_distribution(capsys) -> None:
    assert main(["--profile", "b200", "--assume-packages", "all", "--json"]) == 0
    packages = json.loads(capsys.readouterr().out)["hardware"]["packages"]
    assert {"flash-attn", "flash-attn-3", "flash-attn-4", "liger-kernel"} <= set(packages)


def test_overrides_are_honoured(capsys) -> None:
    assert main(["--profile", "a100", "--assume-packages", "all", "--json",
                 "kernels.attention=eager", "kernels.fused_ops=none"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert kernels["attention"]["choice"] == "eager"
    assert kernels["fused_ops"]["choice"] == "none"


def test_this_machine_is_detected_and_self_checked(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hardware: ")
    assert "self-check passed" in out


def test_selfcheck_can_be_switched_off(capsys) -> None:
    assert main(["--json", "kernels.selfcheck=false"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kernels"]["attention"]["selfcheck"] == "skipped (kernels.selfcheck=false)"


def test_table_is_the_generated_table(capsys) -> None:
    assert main(["--table"]) == 0
    assert capsys.readouterr().out == markdown_kernel_table()


def test_parse_kernel_overrides() -> None:
    cfg = parse_kernel_overrides(["kernels.precision=fp32", "kernels.selfcheck=no"])
    assert (cfg.precision, cfg.selfcheck, cfg.attention) == ("fp32", False, "auto")


def test_memory_of_a_full_8b_fine_tune_on_8_h100(capsys) -> None:
    assert main(["--profile", "h100", "--nproc", "8", "model=llama3_1_8b", "peft=none",
                 "trainer.micro_batch_size=1"]) == 0
    out = capsys.readouterr().out
    plan_table, memory = out.split("\n\n", 1)
    assert plan_table.startswith("hardware: NVIDIA H100")
    assert memory.startswith("memory estimate: meta-llama/Llama-3.1-8B-Instruct")
    assert "on 8 processes (NVIDIA H100 80GB HBM3, simulated, 8 devices of 79.1 GiB)" in memory
    assert ("distributed: fsdp2 (full fine-tune of 8.0B params: ddp over 8 processes needs "
            "about ") in memory
    assert "; fsdp2 over 8 processes needs about " in memory
    assert "memory per device (fsdp2 over 8 processes):" in memory


def test_json_has_the_memory_block(capsys) -> None:
    assert main(["--profile", "h100", "--json", "--nproc", "8", "model=llama3_1_8b",
                 "peft=none", "trainer.micro_batch_size=1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["hardware", "kernels", "env", "memory"]
    memory = data["memory"]
    assert (memory["strategy"], memory["cpu_offload"], memory["fits"]) == ("fsdp2", False, True)
    assert memory["estimate"]["params"] == 8_030_261_248
    considered = memory["considered"]
    assert considered["ddp"]["bytes"]["total"] > considered["fsdp2"]["bytes"]["total"]


def test_default_estimates_the_tiny_lora_recipe(capsys) -> None:
    assert main(["--profile", "cpu", "--recipe", "lora_sft"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate: tiny on 1 process" in out
    assert "distributed: single (LoRA r=16 on 6.9M params" in out


def test_a_model_config_out_of_reach_is_said_not_fatal(capsys) -> None:
    assert main(["--profile", "h100", "model.name_or_path=someorg/not-cached"]) == 0
    out = capsys.readouterr().out
    assert "not estimated: model.name_or_path=someorg/not-cached: could not load it" in out
    assert "pass the local folder instead" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--nproc", "2", "distributed=single"], "--nproc 1"),
    (["trainer.micro_batch=1"], "Did you mean 'trainer.micro_batch_size'?"),
])
def test_bad_run_overrides_exit_2(capsys, argv: list[str], message: str) -> None:
    assert main(["--profile", "h100", *argv]) == 2
    assert message in capsys.readouterr().err
