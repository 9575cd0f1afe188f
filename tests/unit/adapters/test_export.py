"""load_trained_model and merge_to_folder on an adapter whose LoRA weights are non-zero.

A freshly initialised LoRA has B = 0 and changes nothing, so every test here starts from an
adapter with random B: a merge or a load that dropped the adapter would show in the logits.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.adapters import apply_adapter
from finetune.adapters.export import load_trained_model, merge_to_folder
from finetune.checkpoint.files import write_manifest
from finetune.errors import CheckpointError, ConfigError


@dataclass
class TrainedAdapter:
    folder: Path  # adapter + tokenizer, as a run's final/ holds them
    run_config_yaml: str  # the `model` and `peft` groups a checkpoint's config.yaml carries
    trainable: dict[str, torch.Tensor]  # what a checkpoint's trainable.safetensors holds
    input_ids: torch.Tensor
    logits: torch.Tensor  # the PeftModel's logits on input_ids
    base_logits: torch.Tensor  # the same input with the adapter disabled


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir: Path, load_base, peft_cfg) -> TrainedAdapter:
    from transformers import AutoTokenizer

    cfg = peft_cfg(method="lora", r=4, alpha=8)
    model = apply_adapter(load_base(), cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    input_ids = torch.tensor([[1, 17, 250, 999, 42, 7, 1500, 3, 64]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
    folder = tmp_path_factory.mktemp("adapter") / "final"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    run_config = {"model": {"name_or_path": str(tiny_model_dir)},
                  "peft": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return TrainedAdapter(folder, OmegaConf.to_yaml(run_config), trainable, input_ids, logits,
                          base_logits)


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def _write_checkpoint(directory: Path, trained: TrainedAdapter,
                      weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(trained.run_config_yaml, encoding="utf-8")
    save_file(weights, str(directory / "trainable.safetensors"))
    write_manifest(directory, {"step": 3})
    return directory


def test_merge_gives_a_plain_hf_folder_with_the_adapters_logits(
        trained: TrainedAdapter, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_to_folder(trained.folder, tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert list(tmp_path.iterdir()) == [out]  # the temporary build folder is gone
    assert not (out / "adapter_config.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as merged, \
            safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as base:
        assert set(merged.keys()) == set(base.keys())  # no lora_ keys, nothing missing
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = _logits(merged_model, trained.input_ids)
    torch.testing.assert_close(got, trained.logits, rtol=1e-5, atol=1e-5)
    assert (got - trained.base_logits).abs().max() > 1e-2  # the adapter really changed them
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


def test_merge_refuses_a_non_empty_out_dir(trained: TrainedAdapter, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=str(out)):
        merge_to_folder(trained.folder, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_run_dir_loads_its_final_adapter(trained: TrainedAdapter, tmp_path: Path) -> None:
    from peft import PeftModel

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(trained.run_config_yaml, encoding="utf-8")
    shutil.copytree(trained.folder, run / "final")
    model, tokenizer = load_trained_model(run)
    assert isinstance(model, PeftModel)
    assert torch.equal(_logits(model, trained.input_ids), trained.logits)
    assert tokenizer.eos_token == "<|end|>"


def test_checkpoint_dir_rebuilds_the_adapter_from_its_config(trained: TrainedAdapter,
                                                            tmp_path: Path) -> None:
    ckpt = _write_checkpoint(tmp_path / "checkpoints/step_0000003", trained, trained.trainable)
    model, _ = load_trained_model(ckpt)
    assert torch.equal(_logits(model, trained.input_ids), trained.logits)


def test_checkpoint_that_fails_its_manifest_is_refused(trained: TrainedAdapter,
                                                       tmp_path: Path) -> None:
    ckpt = _write_checkpoint(tmp_path / "step_0000003", trained, trained.trainable)
    config = ckpt / "config.yaml"
    size = config.stat().st_size
    with open(config, "r+b") as f:  # one byte changed in place: the size still matches
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    assert config.stat().st_size == size
    with pytest.raises(CheckpointError, match="config.yaml does not match its checksum"):
        load_trained_model(ckpt)


def test_checkpoint_with_foreign_weights_is_refused(trained: TrainedAdapter,
                                                    tmp_path: Path) -> None:
    weights = {**trained.trainable, "base_model.model.lm_head.lora_A.default.weight":
               torch.zeros(4, 256)}
    ckpt = _write_checkpoint(tmp_path / "step_0000003", trained, weights)
    with pytest.raises(CheckpointError, match="lm_head.lora_A"):
        load_trained_model(ckpt)


def test_checkpoint_missing_weights_is_refused(trained: TrainedAdapter, tmp_path: Path) -> None:
    weights = {n: t for n, t in trained.trainable.items() if "layers.5." not in n}
    ckpt = _write_checkpoint(tmp_path / "step_0000003", trained, weights)
    with pytest.raises(CheckpointError, match="layers.5"):
        load_trained_model(ckpt)


def test_run_dir_without_final_points_at_its_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("seed: 1\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="checkpoints/step_NNNNNNN"):
        load_trained_model(tmp_path)


def test_final_keeps_the_chat_template_the_run_trained_with(tmp_path: Path,
                                                           tiny_model_dir: Path) -> None:
    """A tokenizer without a chat template gets the one training used, so final/ generates as
    it was trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.adapters.export import export_final
    from finetune.data.template import BUILTIN_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    final = export_final(model, tokenizer, tmp_path, chat_template=BUILTIN_CHAT_TEMPLATE)
    reloaded = AutoTokenizer.from_pretrained(str(final))
    assert reloaded.chat_template == BUILTIN_CHAT_TEMPLATE
    assert not list(tmp_path.glob(".final-*"))
