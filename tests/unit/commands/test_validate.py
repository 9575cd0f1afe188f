"""`finetune validate`: the resolved config on stdout stays YAML; the memory estimate and the
strategy go to stderr, for --nproc processes on this or a --profile machine."""

from __future__ import annotations

import pytest
import yaml

from finetune.cli import dispatch
from finetune.errors import ConfigError


def test_estimate_for_8_h100_goes_to_stderr(capsys) -> None:
    assert dispatch(["validate", "full_sft", "model=llama3_1_8b", "trainer.micro_batch_size=1",
                     "--profile", "h100", "--nproc", "8"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert "memory" not in out and "# " not in out
    lines = err.splitlines()
    assert all(line.startswith("# ") for line in lines)
    assert lines[0].startswith("# memory estimate: meta-llama/Llama-3.1-8B-Instruct")
    assert any(line.startswith("# distributed: fsdp2 (full fine-tune of 8.0B params: ddp over 8 "
                               "processes needs about ") for line in lines)
    assert lines[-1] == "# ok: full_sft composes and validates"


def test_one_process_on_this_machine_by_default(capsys) -> None:
    assert dispatch(["validate", "lora_sft"]) == 0
    err = capsys.readouterr().err
    assert "# memory estimate: tiny on 1 process" in err
    assert "# distributed: single (LoRA r=16 on 6.9M params" in err


def test_single_with_several_processes_is_refused() -> None:
    with pytest.raises(ConfigError, match="--nproc 1"):
        dispatch(["validate", "lora_sft", "distributed=single", "--nproc", "2"])


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ConfigError, match="valid profiles"):
        dispatch(["validate", "lora_sft", "--profile", "h1000"])
