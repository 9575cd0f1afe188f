"""A group option the user selects gives that option's values under every recipe.

A recipe's own values are applied after its groups (`_self_` last), so a value a primary config
sets for a group section would silently override whatever option the user picks for that group
(`finetune run dpo trainer=default` once trained 40 steps). Tiny-model demo settings live in
group options of their own (`trainer=quick_dpo`, `optim=quick_full_sft`) instead.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import compose_run_config, recipe_names, shipped_config_dir
from finetune.config.schema import GROUP_SCHEMAS

CONFIGS = shipped_config_dir()
RECIPES = recipe_names()


def _group_alone(group: str, option: str) -> dict:
    """The schema's defaults for the group, then the option's file: nothing from a recipe."""
    expected = asdict(GROUP_SCHEMAS[group]())
    expected.update(OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))
                    or {})
    return expected


@pytest.mark.parametrize("recipe", RECIPES)
def test_trainer_default_and_optim_adamw_give_those_groups_values(recipe: str) -> None:
    cfg = compose_run_config(recipe, ["trainer=default", "optim=adamw"])
    assert asdict(cfg.trainer) == _group_alone("trainer", "default"), recipe
    assert asdict(cfg.optim) == _group_alone("optim", "adamw"), recipe
    assert cfg.trainer.max_steps == -1 and cfg.optim.lr == 2e-4


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_primary_config_sets_no_value_of_a_group_it_selects(recipe: str) -> None:
    """Every option of every schema'd group composes under the recipe to the option's own
    values (data/jsonl needs a path, which the command line gives)."""
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{recipe}.yaml")) or {}
    pinned = sorted(set(own) & set(GROUP_SCHEMAS))
    assert not pinned, (f"{recipe}.yaml sets {pinned} after its defaults list, overriding the "
                        "option a user selects; put the values in a group option instead")
    for group in ("trainer", "optim", "peft"):
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            cfg = compose_run_config(recipe, [f"{group}={path.stem}"])
            assert asdict(getattr(cfg, group)) == _group_alone(group, path.stem), (
                f"{recipe} {group}={path.stem}")
