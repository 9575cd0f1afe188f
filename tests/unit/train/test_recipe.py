"""The recipe interface: each shipped recipe states what it trains, and a config that does not
fit the recipe is refused before any work."""

from __future__ import annotations

import pytest

from finetune.config.compose import compose_run_config, recipe_names
from finetune.errors import ConfigError
from finetune.train.loss import causal_lm_loss
from finetune.train.recipe import Recipe, load_recipe


def test_every_shipped_recipe_defines_its_recipe() -> None:
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.trains in ("adapter", "all")
        recipe.check(compose_run_config(name, []))  # its own config fits it


def test_lora_sft_and_full_sft_differ_in_what_they_train() -> None:
    assert load_recipe("lora_sft").trains == "adapter"
    assert load_recipe("full_sft").trains == "all"


@pytest.mark.parametrize(("recipe", "override", "expected"), [
    ("lora_sft", "peft=none", "run full_sft"),
    ("full_sft", "peft=lora", "run lora_sft"),
])
def test_a_config_that_does_not_fit_the_recipe_is_refused(recipe: str, override: str,
                                                          expected: str) -> None:
    cfg = compose_run_config(recipe, [override])
    with pytest.raises(ConfigError, match=expected):
        load_recipe(recipe).check(cfg)


def test_data_formats_are_checked_on_the_config_and_on_the_detected_data() -> None:
    recipe = Recipe(name="pairs", loss=causal_lm_loss, trains="adapter",
                    data_formats=("preference",))
    with pytest.raises(ConfigError, match="data.format"):
        recipe.check(compose_run_config("lora_sft", ["data.format=alpaca"]))
    recipe.check(compose_run_config("lora_sft", ["data.format=auto"]))
    recipe.check_data_format("preference")
    with pytest.raises(ConfigError, match="alpaca rows"):
        recipe.check_data_format("preference+alpaca")


def test_unknown_recipe_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="finetune ls"):
        load_recipe("no_such_recipe")


@pytest.mark.parametrize(("recipe", "trained_dtype"), [("full_sft", "float32"),
                                                       ("lora_sft", "float32")])
def test_weights_that_train_stay_fp32_on_a_bf16_plan(recipe: str, trained_dtype: str,
                                                     tiny_model_dir) -> None:
    """A full fine-tune on a bf16 plan keeps fp32 weights (bf16 would lose small updates);
    an adapter run keeps its frozen base in bf16 and its adapter in fp32."""
    import torch

    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import profile_by_name
    from finetune.kernels import plan
    from finetune.train.setup import _build_model

    kernel_plan = plan(profile_by_name("a100"), KernelsConfig(attention="sdpa"))
    assert kernel_plan.base_dtype == torch.bfloat16
    model = _build_model(compose_run_config(recipe, []), kernel_plan)
    trained = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
    frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
              if not p.requires_grad}
    assert trained == {trained_dtype}
    assert frozen == (set() if recipe == "full_sft" else {"bfloat16"})


@pytest.mark.parametrize(("peft", "lora", "per_layer"), [("lora", "auto", 7), ("lora", "peft", 0),
                                                         ("dora", "auto", 0)])
def test_the_model_gets_the_plan_s_lora_forward(peft: str, lora: str, per_layer: int,
                                                tiny_model_dir) -> None:
    """kernels.lora=auto (fused) reaches every LoRA linear of the run's model; peft keeps peft's
    forward, and so does DoRA, which the fused path does not cover."""
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import profile_by_name
    from finetune.kernels import plan
    from finetune.kernels.lora_linear import fused_lora_class
    from finetune.train.setup import _build_model

    kernel_plan = plan(profile_by_name("cpu"), KernelsConfig(lora=lora))
    cfg = compose_run_config("lora_sft", [f"peft={peft}"])
    model = _build_model(cfg, kernel_plan)
    fused = sum(type(m) is fused_lora_class() for m in model.modules())
    assert fused == per_layer * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
