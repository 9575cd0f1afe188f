"""FSDP2's units, as torchtitan makes them: each decoder layer, the input embeddings and
[final norm, LM head] are their own units; the last decoder layer and the head stay gathered
after the forward (the backward starts with them), the other units are resharded."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from finetune.adapters import apply_adapter
from finetune.config.schema import PeftConfig
from finetune.distributed.engine import shard_units


def _resharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 frees `module`'s gathered weights after its forward."""
    group = module._get_fsdp_state()._fsdp_param_group
    return group.post_forward_mesh_info is not None


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_units_and_what_stays_gathered_after_forward(tiny_model_dir: Path,
                                                     one_rank_group) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoModelForCausalLM

    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), PeftConfig())
    mesh = init_device_mesh("cpu", (1,))
    layers = shard_units(model, functools.partial(fully_shard, mesh=mesh),
                         reshard_after_forward=True)
    base = model.get_base_model()
    embeddings, head, norm = base.get_input_embeddings(), base.lm_head, base.model.norm
    assert len(layers) == base.config.num_hidden_layers
    for unit in (*layers, embeddings, head, model):
        assert isinstance(unit, FSDPModule)
    if tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 6):
        assert head._get_fsdp_state() is norm._get_fsdp_state()  # one unit
    assert [_resharded(layer) for layer in layers] == [True] * (len(layers) - 1) + [False]
    assert _resharded(embeddings) and not _resharded(head)
    # The names state dicts and checkpoints use are unchanged by sharding.
    assert all("_fsdp" not in name and "_orig_mod" not in name
               for name, _ in model.named_parameters())
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[:2] == (1, 3)


class _Bf16Accelerator:
    """What FullyShard.prepare uses of accelerate's Accelerator, on one CPU process with the
    plan's bf16 autocast."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    native_amp = True

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def prepare_optimizer(self, optimizer, device_placement=None):
        return optimizer


def test_no_autocast_on_top_of_the_mixed_precision_policy(tiny_model_dir: Path,
                                                          one_rank_group) -> None:
    """The policy already gathers the weights in bf16: the forward runs them as they are, with
    no autocast around it, and returns fp32 outputs as a replicated model does."""
    from transformers import AutoModelForCausalLM

    from finetune.distributed.engine import FullyShard

    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), PeftConfig())
    seen: list[tuple[bool, torch.dtype]] = []
    proj = model.get_base_model().model.layers[0].self_attn.q_proj

    def record(module, args):
        seen.append((torch.is_autocast_enabled("cpu"), module.base_layer.weight.dtype))

    proj.register_forward_pre_hook(record)
    engine = FullyShard(param_dtype=torch.bfloat16)
    prepared, _ = engine.prepare(_Bf16Accelerator(), model,
                                 lambda params: torch.optim.AdamW(params, lr=1e-3))
    out = prepared(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [(False, torch.bfloat16)]
    assert out.logits.dtype == torch.float32
