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
