"""Every shipped config composes, and composing gives what its files say.

A recipe's config is the schema's defaults, then each group option its defaults list selects,
then its own values; a group option swapped in on the command line replaces the recipe's choice
for that group. Every YAML file under configs/ is composed here: each primary as its recipe,
each group option in a recipe that selects that group.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import compose_run_config, recipe_names, shipped_config_dir

REPO = Path(__file__).resolve().parents[2]
CONFIGS = shipped_config_dir()
PRIMARIES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# The default recipe first: a group option is composed into it unless another recipe shows more.
BY_PREFERENCE = sorted(PRIMARIES, key=lambda recipe: recipe != "lora_sft")
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
# Options whose file leaves a mandatory key for the user: the value a user would give.
REQUIRED = {("data", "jsonl"): {"path": "train.jsonl"}}


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


def _defaults(recipe: str) -> dict[str, str]:
    """group -> option selected by the recipe's defaults list."""
    entries = _yaml(CONFIGS / f"{recipe}.yaml")["defaults"]
    return {group: option for entry in entries if isinstance(entry, dict)
            for group, option in entry.items()}


def _recipe_for(group: str, option: str) -> str:
    """A recipe that selects `group`, preferring one whose own choice differs from `option`,
    so that composing it with `group=option` shows the swap took effect."""
    using = [r for r in BY_PREFERENCE if group in _defaults(r)]
    assert using, f"configs/{group}/ is selected by no recipe, so none of its options can be used"
    return next((r for r in using if _defaults(r)[group] != option), using[0])


def _expected_section(cfg: object, group: str, option: str, recipe: str) -> dict:
    """The schema's defaults for the group, then the option's file, then the recipe's own values
    for the group (which Hydra applies last, through `_self_`)."""
    section = type(getattr(cfg, group))()
    expected = asdict(section)
    expected.update(_yaml(CONFIGS / group / f"{option}.yaml"))
    expected.update(REQUIRED.get((group, option), {}))
    expected.update(_yaml(CONFIGS / f"{recipe}.yaml").get(group, {}))
    return expected


def test_every_recipe_module_has_a_primary_config_and_the_reverse() -> None:
    modules = {p.stem for p in (REPO / "recipes").glob("*.py") if not p.stem.startswith("_")}
    assert set(recipe_names()) == modules == set(PRIMARIES)


@pytest.mark.parametrize("recipe", PRIMARIES)
def test_recipe_composes_to_its_defaults_list_and_own_values(recipe: str) -> None:
    cfg = compose_run_config(recipe, [])
    own = _yaml(CONFIGS / f"{recipe}.yaml")
    for group, option in _defaults(recipe).items():
        assert asdict(getattr(cfg, group)) == _expected_section(cfg, group, option, recipe), (
            f"{recipe}.yaml: {group}={option}")
    for key, value in own.items():
        if not isinstance(value, dict | list):
            assert getattr(cfg, key) == value, f"{recipe}.yaml: {key}"


GROUP_OPTIONS = sorted((group, p.stem) for group in GROUPS
                       for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_group_option_replaces_the_recipes_choice(group: str, option: str) -> None:
    recipe = _recipe_for(group, option)
    required = [f"{group}.{k}={v}" for k, v in REQUIRED.get((group, option), {}).items()]
    cfg = compose_run_config(recipe, [f"{group}={option}", *required])
    assert asdict(getattr(cfg, group)) == _expected_section(cfg, group, option, recipe), (
        f"{recipe} {group}={option}")
