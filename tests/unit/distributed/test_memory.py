"""The memory estimate: parameter counts equal transformers' models, LoRA counts equal peft's,
activations equal what autograd keeps, and sharding/offload move the bytes they should."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from finetune.config.schema import PeftConfig, PeftMethod
from finetune.distributed.choose import PUBLISHED_CONFIGS
from finetune.distributed.memory import (
    GIB,
    Workload,
    estimate_memory,
    model_shape,
)

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=500)
CONFIGS = {
    "llama": LlamaConfig(**SMALL),
    "llama_biases": LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama_head_dim": LlamaConfig(**SMALL, head_dim=24),
    "mistral": MistralConfig(**SMALL),
    "qwen2": Qwen2Config(**SMALL),
    "qwen2_tied": Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**SMALL, head_dim=16),
    "gemma": GemmaConfig(**SMALL, head_dim=16),  # not counted from the config: meta model
}


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_counts_equal_transformers(name: str) -> None:
    config = CONFIGS[name]
    model = _meta_model(config)
    shape = model_shape(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert shape.layer_params == sum(p.numel() for p in layer.parameters())
    assert shape.outer_params == shape.params - shape.layers * shape.layer_params
    head = model.get_output_embeddings()
    linears = {n: (m.in_features, m.out_features, m.bias is not None)
               for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head}
    assert {lin.name: (lin.in_features, lin.out_features, lin.bias)
            for lin in shape.linears} == linears


def test_llama_3_1_8b_has_8_03b_parameters() -> None:
    from transformers import AutoConfig

    model_type, sizes = PUBLISHED_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
    shape = model_shape(AutoConfig.for_model(model_type, **sizes))
    assert shape.params == 8_030_261_248
    assert f"{shape.params / 1e9:.2f}" == "8.03"


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                                    "mistralai/Mistral-7B-Instruct-v0.3"])
def test_published_shapes_count_like_their_models(hub_id: str) -> None:
    from transformers import AutoConfig

    model_type, sizes = PUBLISHED_CONFIGS[hub_id]
    config = AutoConfig.for_model(model_type, **sizes)
    expected = {"Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
                "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
                "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552}[hub_id]
    assert model_shape(config).params == expected
    assert sum(p.numel() for p in _meta_model(config).parameters()) == expected


@pytest.mark.parametrize(("method", "targets", "bias"), [
    ("lora", "all-linear", "none"),
    ("dora", "all-linear", "none"),
    ("lora", ["q_proj", "v_proj"], "none"),
    ("lora", r".*\.mlp\..*_proj", "none"),
    ("lora", ["q_proj", "down_proj"], "lora_only"),
    ("lora", ["o_proj"], "all"),
])
def test_adapter_counts_equal_peft(method: str, targets, bias: str) -> None:
    from peft import LoraConfig, get_peft_model

    config = CONFIGS["qwen2"]  # q/k/v carry biases, so peft.bias matters
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(
        r=8, target_modules=targets, use_dora=method == "dora", bias=bias))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    workload = Workload(shape=model_shape(config), peft_method=method, lora_r=8,
                        target_modules=targets, peft_bias=bias)
    assert workload.trainable_params() == trainable


def _saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward, besides the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(("method", "checkpointing"),
                         [("none", False), ("none", True), ("lora", False), ("lora", True)])
def test_activations_equal_what_autograd_keeps(method: str, checkpointing: bool) -> None:
    """Full fine-tune: fp32 weights under bf16 autocast; LoRA: a bf16 base with fp32 adapters
    (the kernel plan's dtypes). Sizes chosen so no two tensor shapes coincide."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(hidden_size=192, intermediate_size=520, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if method == "lora":
        model = get_peft_model(model.to(torch.bfloat16),
                               LoraConfig(r=8, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if checkpointing:
            model.enable_input_require_grads()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    rows, seq_len = 2, 90
    saved = _saved_bytes(model, torch.randint(0, 1000, (rows, seq_len)))
    workload = Workload(shape=model_shape(config), peft_method=method, lora_r=8,
                        micro_batch_size=rows, seq_len=seq_len,
                        gradient_checkpointing=checkpointing)
    parts = workload.activation_parts()
    kept = parts["layers"] + parts["outside"] + parts["logits_kept"]
    # Autocast's weight copies are saved too; under checkpointing only the head's outside the
    # recomputed layer, which the hook does not see.
    copies = workload.estimate("single").weight_copies
    if checkpointing:
        copies = 2 * config.vocab_size * config.hidden_size if method == "none" else 0
    assert kept + copies == pytest.approx(saved, rel=0.03)
    assert (parts["recomputed"] > 0) == checkpointing


def _llama_8b() -> Workload:
    from transformers import AutoConfig

    model_type, sizes = PUBLISHED_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]
    return Workload(shape=model_shape(AutoConfig.for_model(model_type, **sizes)),
                    peft_method="none", micro_batch_size=1, seq_len=2048)


def test_full_fine_tune_holds_weights_grads_and_two_adam_states_in_fp32() -> None:
    est = _llama_8b().estimate("single")
    params = 8_030_261_248
    assert (est.weights, est.gradients, est.optimizer) == (4 * params, 4 * params, 8 * params)
    assert est.weight_copies > 2 * 0.9 * params  # bf16 copies autocast keeps for the backward
    ddp = _llama_8b().estimate("ddp", 8)
    assert ddp.gradients == 2 * est.gradients  # DDP's bucket copy
    # fsdp2 gathers the weights in bf16 (its param_dtype): no autocast copies.
    fsdp2 = _llama_8b().estimate("fsdp2", 8)
    shape = _llama_8b().shape
    assert fsdp2.weight_copies == 0
    assert fsdp2.gathered == (shape.outer_params + 2 * shape.layer_params) * 2
    assert est.total == sum(est.to_dict()["bytes"][k] for k in (
        "weights", "gathered", "weight_copies", "reference", "gradients", "optimizer",
        "activations", "overhead"))


@pytest.mark.parametrize("world", [2, 8])
def test_sharding_divides_the_sharded_state_by_the_world_size(world: int) -> None:
    workload = _llama_8b()
    single = workload.estimate("single")
    fsdp = workload.estimate("fsdp2", world)
    assert fsdp.weights == single.weights // world
    assert fsdp.optimizer == single.optimizer // world
    assert fsdp.gradients < single.gradients / world + 5 * GIB  # + the unsharded root/layer
    assert fsdp.gathered > 0
    zero2 = workload.estimate("deepspeed_zero2", world)
    zero3 = workload.estimate("deepspeed_zero3", world)
    # DeepSpeed: 16-bit weights and gradients, 12 bytes of optimizer state (fp32 master, m, v).
    assert zero2.weights == 2 * single.params
    assert zero2.gradients == 2 * single.params // world
    assert zero2.optimizer == 12 * single.params // world
    assert zero3.weights == 2 * single.params // world
    assert zero3.total < zero2.total < single.total


def test_cpu_offload_moves_state_to_host_memory() -> None:
    workload = _llama_8b()
    kept = workload.estimate("fsdp2", 8)
    offloaded = workload.estimate("fsdp2", 8, cpu_offload=True)
    assert offloaded.weights == offloaded.optimizer == 0
    assert offloaded.host == kept.weights + kept.optimizer + (
        kept.gradients - offloaded.gradients)
    assert offloaded.total < kept.total
    zero2 = workload.estimate("deepspeed_zero2", 8)
    zero2_off = workload.estimate("deepspeed_zero2", 8, cpu_offload=True)
    assert (zero2_off.optimizer, zero2_off.host) == (0, zero2.optimizer)
    assert zero2_off.weights == zero2.weights


def test_qlora_stores_the_base_in_about_4_bits() -> None:
    workload = _llama_8b()
    lora = Workload(shape=workload.shape, peft_method="lora").estimate("single")
    qlora = Workload(shape=workload.shape, peft_method="qlora").estimate("single")
    assert lora.weights / qlora.weights > 2.5  # embeddings and head stay in bf16
    assert qlora.trainable_params == lora.trainable_params == 41_943_040


def test_gradient_checkpointing_and_fused_cross_entropy_lower_activations() -> None:
    workload = _llama_8b()
    plain = workload.activation_bytes()
    assert replace(workload, gradient_checkpointing=True).activation_bytes() < plain / 3
    assert replace(workload, fused_linear_cross_entropy=True).activation_bytes() < plain
    assert replace(workload, eager_attention=True).activation_bytes() > plain


def test_estimate_memory_takes_a_peft_config_and_plain_dtypes() -> None:
    est = estimate_memory(CONFIGS["llama"], peft=PeftConfig(method=PeftMethod.none),
                          micro_batch_size=2, seq_len=64, gradient_checkpointing=False,
                          base_dtype="bf16", trainable_dtype=torch.float32,
                          compute_dtype="bf16", strategy="ddp", world_size=2)
    assert est.trainable_params == est.params == model_shape(CONFIGS["llama"]).params
    assert (est.strategy, est.world_size, est.rows, est.seq_len) == ("ddp", 2, 2, 64)
    text = est.describe()
    assert "ddp over 2 processes" in text and "2 x 64 tokens" in text
    assert text.splitlines()[-1].split()[-2] == f"{est.total / GIB:.1f}"


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="auto"):
        _llama_8b().estimate("auto")
