"""QLoRA: where 4-bit NF4 loading is supported and the refusal elsewhere (every profile); on the
CPU backend of bitsandbytes, when it is installed, a real 4-bit tiny model trains a LoRA adapter
that loads with plain peft; merging a QLoRA run goes into a 16-bit base and says so."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.adapters.export import merge_to_folder
from finetune.adapters.qlora import check_qlora, qlora_support, quantization_config
from finetune.errors import ConfigError
from finetune.hardware.simulated import profile_by_name

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize(("profile", "supported"), [
    ("t4", True), ("a100", True), ("h100", True), ("gh200", True), ("rtx5090", True),
    ("mi250x", True), ("mi300x", True), ("mi355x", True), ("rx7900xtx", True), ("rx9070", True),
    ("xpu-max1550", True), ("cpu", True), ("cpu-amx", True), ("mps", False),
])
def test_support_follows_the_bitsandbytes_table(profile: str, supported: bool) -> None:
    ok, reason = qlora_support(profile_by_name(profile, assume_packages="all"))
    assert ok is supported, reason
    assert reason


def test_old_nvidia_and_unknown_amd_archs_are_refused() -> None:
    h100 = profile_by_name("h100", assume_packages="all")
    ok, reason = qlora_support(replace(h100, compute_capability=(5, 2), arch="sm_52"))
    assert not ok and "sm60" in reason
    mi300 = profile_by_name("mi300x", assume_packages="all")
    ok, reason = qlora_support(replace(mi300, arch="gfx906"))
    assert not ok and "gfx906" in reason


@pytest.mark.parametrize("profile", ["h100", "cpu", "mi300x"])
def test_without_the_package_it_is_refused_naming_the_extra(profile: str) -> None:
    ok, reason = qlora_support(profile_by_name(profile))
    assert not ok and "finetune[qlora]" in reason


def test_refusal_names_the_reason_and_the_alternatives() -> None:
    with pytest.raises(ConfigError) as err:
        check_qlora(profile_by_name("mps", assume_packages="all"))
    message = str(err.value)
    assert "peft=qlora cannot run here" in message and "MPS" in message
    assert "peft=lora" in message and "smaller model" in message
    assert err.value.exit_code == 2
    assert "NVIDIA" in check_qlora(profile_by_name("h100", assume_packages="all"))


def test_quantization_config_is_nf4_with_double_quantisation() -> None:
    config = quantization_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
def test_qlora_trains_on_the_cpu_and_its_adapter_loads_with_plain_peft(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.adapters import apply_adapter
    from finetune.config.schema import ModelConfig, PeftConfig
    from finetune.models import load_model

    torch.manual_seed(0)
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), attn_implementation="sdpa",
                      dtype=torch.float32, quantization=quantization_config(torch.float32))
    assert base.is_loaded_in_4bit
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    # A plain PeftConfig: "qlora" is a value of the peft.method schema once peft=qlora ships.
    model = apply_adapter(base, PeftConfig(method="qlora", r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(10, 400, (2, 24))
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         str(tmp_path / "adapter"))
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, saved[name].to(param.dtype)), name


def _lora_adapter(tiny_model_dir: Path, peft_cfg, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune.adapters import apply_adapter

    torch.manual_seed(0)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          peft_cfg(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(folder)
    shutil.copy(tiny_model_dir / "tokenizer.json", folder)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", folder)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_merging_a_qlora_run_uses_a_16_bit_base_and_says_so(
        tiny_model_dir: Path, peft_cfg, tmp_path: Path, caplog, precision, dtype) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _lora_adapter(tiny_model_dir, peft_cfg, run / "final")
    (run / "config.yaml").write_text("peft:\n  method: qlora\n", encoding="utf-8")
    (run / "kernel_plan.json").write_text(json.dumps(
        {"kernels": {"precision": {"choice": precision}}}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        out = merge_to_folder(run, tmp_path / "merged")
    assert f"merged into the base loaded in {str(dtype).removeprefix('torch.')}" in caplog.text
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {dtype}


def test_merging_a_run_without_an_adapter_is_refused(tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    run = tmp_path / "full"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "config.yaml").write_text("peft:\n  method: none\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="has no adapter to merge") as err:
        merge_to_folder(run, tmp_path / "merged")
    assert err.value.exit_code == 2
    assert not (tmp_path / "merged").exists()
