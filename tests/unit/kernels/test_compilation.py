"""kernels.compile=on compiles one decoder layer at a time (torchtitan's practice), not the
whole model: the embeddings, the head and the loss stay eager, and the weights keep their
names."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import ConfigError
from finetune.kernels.compilation import compile_decoder_layers


def _lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


def test_each_decoder_layer_is_compiled_and_nothing_else() -> None:
    model = _lora_llama()
    names = list(model.state_dict())
    assert compile_decoder_layers(model) == 3
    compiled = [type(m).__name__ for m in model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == ["LlamaDecoderLayer"] * 3
    assert list(model.state_dict()) == names  # checkpoints and adapters keep their keys


def test_kernels_compile_on_compiles_the_run_model_layer_by_layer(tiny_model_dir) -> None:
    from finetune.config.compose import compose_run_config
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import profile_by_name
    from finetune.kernels import plan
    from finetune.train.setup import _build_model

    kernel_plan = plan(profile_by_name("cpu"), KernelsConfig(compile="on"))
    assert kernel_plan.compile
    model = _build_model(compose_run_config("lora_sft", []), kernel_plan)
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == model.config.num_hidden_layers
    assert all(type(m).__name__.endswith("DecoderLayer") for m in compiled)


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="kernels.compile=off"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
