"""fsdp2's gradient bytes, counted by hand for a small Llama: each rank's shard of every
gradient, plus the gradients of the root unit and of one decoder layer, which exist unsharded
until they are reduce-scattered."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from finetune.distributed.memory import Workload, model_shape

# hidden 64, MLP 160, 3 layers, 4 heads of 16, 2 key/value heads, vocabulary 500, untied head.
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=500)
# One decoder layer: two RMSNorms, q and o (64x64), k and v (64x32), gate, up and down (64x160).
LAYER = 2 * 64 + 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160  # 43,136
ROOT = 500 * 64 + 64 + 64 * 500  # embeddings, final norm, output head: 64,064
PARAMS = 3 * LAYER + ROOT  # 193,472
# LoRA r=8 on every linear: r * (in + out) each.
LORA_LAYER = 8 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 160) + (160 + 64))  # 8,960
FP32 = 4


def _workload(**kwargs) -> Workload:
    return Workload(shape=model_shape(CONFIG), micro_batch_size=1, seq_len=16, **kwargs)


def test_the_hand_count_is_the_models() -> None:
    shape = model_shape(CONFIG)
    assert (shape.params, shape.layer_params, shape.outer_params) == (PARAMS, LAYER, ROOT)


@pytest.mark.parametrize("world", [2, 4])
def test_full_fine_tune_gradients_are_the_shard_plus_the_unsharded_root_and_layer(
        world: int) -> None:
    est = _workload(peft_method="none").estimate("fsdp2", world)
    assert est.gradients == PARAMS * FP32 // world + (ROOT + LAYER) * FP32
    assert est.gradients == {2: 386_944 + 428_800, 4: 193_472 + 428_800}[world]


def test_lora_gradients_are_the_shard_plus_one_layers_adapter() -> None:
    est = _workload(peft_method="lora", lora_r=8).estimate("fsdp2", 2)
    assert est.trainable_params == 3 * LORA_LAYER
    assert est.gradients == 3 * LORA_LAYER * FP32 // 2 + LORA_LAYER * FP32  # the root: frozen
    assert est.gradients == 53_760 + 35_840


def test_with_cpu_offload_the_unsharded_gradients_stay_on_the_device() -> None:
    est = _workload(peft_method="none").estimate("fsdp2", 2, cpu_offload=True)
    assert est.gradients == (ROOT + LAYER) * FP32 == 428_800
