"""Every shipped config composes into a valid RunConfig, and holds only schema keys."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import compose_run_config, recipe_names, shipped_config_dir
from finetune.config.schema import GROUP_SCHEMAS, RunConfig

GROUP_OPTIONS = sorted(
    (group, path.stem)
    for group in GROUP_SCHEMAS
    for path in (shipped_config_dir() / group).glob("*.yaml")
)


def test_recipes_exist() -> None:
    assert {"lora_sft", "full_sft"} <= set(recipe_names())


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_composes(recipe: str) -> None:
    cfg = compose_run_config(recipe, [])
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == recipe


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "jsonl":
        overrides.append("data.path=train.jsonl")
    cfg = compose_run_config("lora_sft", overrides)
    raw = OmegaConf.load(shipped_config_dir() / group / f"{option}.yaml")
    section = getattr(cfg, group)
    for key, value in OmegaConf.to_container(raw).items():
        if value != "???":
            assert getattr(section, key) == value, f"{group}/{option}.yaml: {key} not applied"


def test_every_group_has_options() -> None:
    groups = {group for group, _ in GROUP_OPTIONS}
    assert groups == set(GROUP_SCHEMAS)
