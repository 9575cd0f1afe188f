"""Hydra overrides: values, group swaps, +/~, and the errors for bad ones."""

from __future__ import annotations

import pytest

from finetune.config.compose import compose_run_config, recipe_names
from finetune.errors import ConfigError


def test_value_overrides_are_typed() -> None:
    cfg = compose_run_config("lora_sft", ["trainer.max_steps=50", "peft.r=4", "optim.lr=2e-4",
                                          "optim.betas=[0.8,0.95]"])
    assert cfg.trainer.max_steps == 50
    assert cfg.peft.r == 4
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert list(cfg.optim.betas) == [0.8, 0.95]


def test_group_swap_and_append_and_delete() -> None:
    cfg = compose_run_config("lora_sft", ["peft=dora", "+data.columns.instruction=question",
                                          "~trainer"])
    assert cfg.peft.method == "dora"
    assert cfg.data.columns == {"instruction": "question"}
    assert cfg.trainer.max_steps == -1  # the group removed: schema default


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.lrr=1", "Did you mean 'optim.lr'"),
    ("+optim.lrr=1", "Did you mean 'optim.lr'"),
    ("trainer.micro_batch_sise=2", "trainer.micro_batch_size"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer=nope", "finetune ls"),
    ("trainer.grad_accum_steps=0", "positive"),
])
def test_bad_override_is_a_config_error(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_run_config("lora_sft", [override])
    assert expected in str(info.value)


def test_unknown_recipe_suggests_the_nearest_and_lists_recipes() -> None:
    with pytest.raises(ConfigError) as info:
        compose_run_config("lora_sftt", [])
    message = str(info.value)
    assert "unknown recipe 'lora_sftt'. Did you mean 'lora_sft'?" in message
    assert f"Recipes: {', '.join(recipe_names())}." in message


def test_missing_mandatory_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.path=VALUE"):
        compose_run_config("lora_sft", ["data=jsonl"])
