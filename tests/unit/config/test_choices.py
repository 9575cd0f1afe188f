"""Closed sets are Enum fields: OmegaConf rejects a bad value, and members act as plain strings."""

from __future__ import annotations

import json
import typing
from dataclasses import fields
from types import NoneType

import pytest
from omegaconf import DictConfig, OmegaConf

from finetune.config import config_dict, config_yaml
from finetune.config.choice import Choice
from finetune.config.compose import compose_dict, compose_run_config, to_run_config
from finetune.config.schema import GROUP_SCHEMAS, PeftMethod
from finetune.errors import ConfigError


def _choice_fields() -> list[tuple[str, type[Choice], bool]]:
    """(full key, Enum, nullable) of every Choice field of the run schema."""
    found = []
    for group, schema in GROUP_SCHEMAS.items():
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, Choice):
                    found.append((f"{group}.{f.name}", kind, NoneType in kinds))
    return found


CHOICE_FIELDS = _choice_fields()


# Keys that take one of a fixed set of values, which a user expects a typo in to fail when the
# config is composed, before any work. The tests below derive their cases from the schema's
# Choice fields; this list is what keeps a key from dropping out of them by becoming a plain str.
CLOSED_SET_KEYS = ["peft.method", "peft.bias", "optim.scheduler", "trainer.on_nan",
                   "trainer.keep_best_by", "logger.mode", "logger.display", "data.truncation",
                   "data.train_on", "data.on_bad_row", "data.text_unit",
                   "kernels.fused_linear_cross_entropy"]


@pytest.mark.parametrize("key", CLOSED_SET_KEYS)
def test_a_typo_in_a_closed_set_fails_at_composition(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=bogus is not valid\. Use one of: "):
        compose_run_config("lora_sft", [f"{key}=bogus"])


@pytest.mark.parametrize(("key", "choice", "nullable"), CHOICE_FIELDS)
def test_members_act_as_their_values(key: str, choice: type[Choice], nullable: bool) -> None:
    for member in choice:
        assert member.name == member.value == member.value.lower()
        assert member == member.value and str(member) == member.value
        assert f"{member}" == member.value and f"{member:>12}" == f"{member.value:>12}"
        assert {member.value: 1}[member] == 1
        assert json.dumps(member) == json.dumps(member.value)


@pytest.fixture(scope="module")
def default_dict() -> DictConfig:
    return compose_dict("lora_sft", [])


@pytest.mark.parametrize(("key", "choice", "nullable"), CHOICE_FIELDS)
def test_every_member_composes(key: str, choice: type[Choice], nullable: bool,
                               default_dict: DictConfig) -> None:
    """Each member is a valid run config: the last one through Hydra's command-line override
    (its grammar reads the value), every one set on the composed config and validated."""
    values = [member.value for member in choice] + (["null"] if nullable else [])
    group, name = key.split(".")
    cfg = compose_run_config("lora_sft", [f"{key}={values[-1]}"])
    assert getattr(getattr(cfg, group), name) == (None if values[-1] == "null"
                                                  else choice(values[-1]))
    for value in values:
        composed = default_dict.copy()
        OmegaConf.update(composed, key, None if value == "null" else value)
        got = getattr(getattr(to_run_config(composed), group), name)
        assert got == (None if value == "null" else choice(value))


@pytest.mark.parametrize(("key", "choice", "nullable"), CHOICE_FIELDS)
def test_a_bad_value_names_key_value_and_choices(key: str, choice: type[Choice],
                                                 nullable: bool) -> None:
    with pytest.raises(ConfigError) as info:
        compose_run_config("lora_sft", [f"{key}=bogus"])
    message = str(info.value)
    allowed = ", ".join([m.value for m in choice] + (["null"] if nullable else []))
    assert f"{key}=bogus is not valid. Use one of: {allowed}." in message
    assert "\n" not in message


@pytest.mark.parametrize(("override", "hint"), [
    ("peft.method=lorra", "Did you mean 'lora'?"),
    ("optim.scheduler=cosin", "Did you mean 'cosine'?"),
    ("kernels.fused_linear_cross_entropy=false", "read as a boolean"),
])
def test_a_near_miss_gets_a_hint(override: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        compose_run_config("lora_sft", [override])


def test_yaml_off_is_explained(tmp_path) -> None:
    # YAML 1.1 reads an unquoted off as false; the error says to quote it.
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - lora_sft\n  - _self_\n"
                    "kernels:\n  fused_linear_cross_entropy: off\n")
    with pytest.raises(ConfigError, match=r'fused_linear_cross_entropy=false \(in config file '
                                          r'mine.yaml\) is not valid.*quote'):
        compose_run_config(str(mine), [])
    mine.write_text(mine.read_text().replace("off", '"off"'))
    assert compose_run_config(str(mine), []).kernels.fused_linear_cross_entropy == "off"


def test_resolved_config_holds_plain_values() -> None:
    cfg = compose_run_config("lora_sft", ["peft=dora", "trainer.keep_best_by=eval_loss"])
    assert isinstance(cfg.peft.method, PeftMethod)
    plain = config_dict(cfg)
    assert type(plain["peft"]["method"]) is str and plain["peft"]["method"] == "dora"
    assert type(plain["trainer"]["keep_best_by"]) is str
    text = config_yaml(cfg)
    assert "  method: dora\n" in text and "keep_best_by: eval_loss\n" in text
    assert "PeftMethod" not in text and "KeepBestBy" not in text
    assert OmegaConf.to_container(OmegaConf.create(text)) == plain  # reads back the same
    json.dumps(plain)


def test_a_config_naming_no_recipe_fails_to_compose(tmp_path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - lora_sft\n  - _self_\nrecipe: lora_sfft\n")
    with pytest.raises(ConfigError, match="recipe='lora_sfft' in the config names no recipe"):
        compose_run_config(str(mine), [])
