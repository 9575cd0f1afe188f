"""A sharded (fsdp2) checkpoint is a model source like any other: eval, generate and merge load
its weights gathered from the shards, in one process without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from finetune.adapters import apply_adapter
from finetune.adapters.export import describe_source, load_trained_model, merge_to_folder
from finetune.checkpoint.files import write_manifest
from finetune.checkpoint.trainable import trainable_state
from finetune.distributed.engine import FullyShard
from finetune.errors import CheckpointError


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    native_amp = False

    def prepare_optimizer(self, optimizer, device_placement=None):
        return optimizer


@pytest.fixture
def sharded_checkpoint(tmp_path: Path, tiny_model_dir: Path, load_base, peft_cfg):
    """(checkpoint folder, its trained LoRA weights): written by fsdp2 on a one-rank group,
    which is gone before the test loads it."""
    cfg = peft_cfg(method="lora", r=4, alpha=8)
    owned = not dist.is_initialized()
    engine = FullyShard()
    model, optimizer = engine.prepare(_Accelerator(), apply_adapter(load_base(), cfg),
                                      lambda params: torch.optim.AdamW(params, lr=0.05))
    ids = torch.arange(2, 34).reshape(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trained = {n: p.full_tensor().detach().clone() for n, p in trainable_state(model).items()}
    _, _, shards = engine.save_state(model, optimizer)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001"
    checkpoint.mkdir(parents=True)
    engine.save_shards(shards, checkpoint)
    if owned:
        dist.destroy_process_group()
    config = {"model": {"name_or_path": str(tiny_model_dir)},
              "peft": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)}
    (checkpoint / "config.yaml").write_text(OmegaConf.to_yaml(config), encoding="utf-8")
    write_manifest(checkpoint, {"step": 1})
    return checkpoint, trained


def test_a_sharded_checkpoint_loads_and_merges(sharded_checkpoint, tmp_path: Path) -> None:
    checkpoint, trained = sharded_checkpoint
    assert not dist.is_initialized()
    found = describe_source(checkpoint)
    assert (found.kind, found.adapter) == ("checkpoint", True)
    model, _ = load_trained_model(checkpoint)
    loaded = trainable_state(model)
    assert set(loaded) == set(trained)
    assert any(name.endswith("lora_B.default.weight") and t.abs().sum() > 0
               for name, t in trained.items())  # one step moved B off zero
    for name, tensor in trained.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    merged = merge_to_folder(checkpoint, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()


def test_a_run_without_final_names_its_newest_checkpoint(sharded_checkpoint) -> None:
    checkpoint, _ = sharded_checkpoint
    run = checkpoint.parent.parent
    (run / "config.yaml").write_text("recipe: lora_sft\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"e.g. {checkpoint}"):
        describe_source(run)


def test_a_deepspeed_checkpoint_gives_its_fp32_master_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from finetune.checkpoint.weights import checkpoint_weights, holds_weights

    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    (tmp_path / "deepspeed").mkdir()
    save_file({"fp32/layer.lora_A.default.weight": weight,
               "exp_avg/layer.lora_A.default.weight": torch.ones(2, 3)},
              str(tmp_path / "deepspeed" / "master.safetensors"))
    assert holds_weights(tmp_path)
    got = checkpoint_weights(tmp_path)
    assert list(got) == ["layer.lora_A.default.weight"]
    assert torch.equal(got["layer.lora_A.default.weight"], weight)
