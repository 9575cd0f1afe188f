"""Weights gathered for compute: none where every rank holds whole weights (single, ddp); under
fsdp2 the root unit and two decoder layers (the one computing and the one prefetched), counted
by hand for a small Llama, at any world size, one process included."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from finetune.distributed.memory import Workload, model_shape

# hidden 64, MLP 160, 3 layers, 4 heads of 16, 2 key/value heads, vocabulary 500, untied head.
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=500)
LAYER = 2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160  # 43,136 parameters
ROOT = 500 * 64 + 64 + 64 * 500  # embeddings, final norm, output head: 64,064
FP32 = 4


def _estimate(strategy: str, world: int):
    workload = Workload(shape=model_shape(CONFIG), micro_batch_size=1, seq_len=16,
                        peft_method="none", base_dtype="fp32", compute_dtype="fp32")
    return workload.estimate(strategy, world)


@pytest.mark.parametrize(("strategy", "world"), [("single", 1), ("ddp", 2)])
def test_whole_weights_on_every_rank_gather_nothing(strategy: str, world: int) -> None:
    assert _estimate(strategy, world).gathered == 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp2_gathers_the_root_and_two_layers(world: int) -> None:
    assert _estimate("fsdp2", world).gathered == (ROOT + 2 * LAYER) * FP32
