"""Compose a recipe's config with Hydra and turn it into a typed, validated `RunConfig`.

Only this module, the command line (`finetune run -m` sweeps through hydra.main) and the recipes
touch Hydra; everything downstream receives the typed `RunConfig`.
"""

from __future__ import annotations

import difflib
import importlib.resources
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import NoneType

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from finetune.config.choice import Choice
from finetune.config.schema import GROUP_SCHEMAS, RunConfig, register_schemas
from finetune.config.validate import validate_run_config
from finetune.errors import ConfigError

CONFIG_PACKAGE = "finetune.configs"
RECIPE_PACKAGE = "finetune.recipes"


def shipped_config_dir() -> Path:
    """The directory holding the shipped YAML configs (inside the installed package)."""
    return Path(str(importlib.resources.files(CONFIG_PACKAGE)))


def recipe_names() -> list[str]:
    """Recipes that exist: a module in finetune.recipes with a primary config of the same name."""
    recipes_dir = Path(str(importlib.resources.files(RECIPE_PACKAGE)))
    configs = shipped_config_dir()
    return sorted(
        p.stem for p in recipes_dir.glob("*.py")
        if not p.stem.startswith("_") and (configs / f"{p.stem}.yaml").is_file()
    )


def resolve_recipe(recipe: str) -> tuple[Path, str]:
    """Return (config directory, config name) for a recipe name or a path to a YAML file.

    Raises ConfigError listing the recipes that exist when the name is unknown.
    """
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}. Check the path, or run "
                              "`finetune ls` to see the shipped recipes.")
        return path.resolve().parent, path.stem
    names = recipe_names()
    if recipe not in names:
        close = difflib.get_close_matches(recipe, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown recipe '{recipe}'.{hint} Recipes: {', '.join(names)}. "
                          "Run `finetune ls` for their configs.")
    return shipped_config_dir(), recipe


def compose_dict(recipe: str, overrides: list[str]) -> DictConfig:
    """Compose the recipe's config with the overrides (Hydra syntax); errors become ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from yaml import YAMLError

    register_schemas()
    config_dir, config_name = resolve_recipe(recipe)
    GlobalHydra.instance().clear()
    shipped = shipped_config_dir()
    search = [] if config_dir == shipped else [f"hydra.searchpath=[file://{shipped}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides) + search)
    except (HydraException, OmegaConfBaseException) as exc:
        raise explain_config_error(exc, overrides) from None
    except YAMLError as exc:
        raise yaml_syntax_error(exc) from None
    finally:
        GlobalHydra.instance().clear()


def yaml_syntax_error(exc: BaseException) -> ConfigError:
    """A YAML syntax error as one paragraph naming the file, line and column."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = (f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None
             else "a config file")
    return ConfigError(f"YAML syntax error in {where}: {problem}. Fix that line (check its "
                       "indentation, colons and brackets) and run again.")


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys present in a typed node but not in its dataclass (e.g. forced in with `+key=`)."""
    unknown = []
    schema = OmegaConf.get_type(node)
    names = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        full = f"{prefix}{key}"
        if names is not None and key not in names:
            unknown.append(full)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            unknown.extend(_unknown_keys(child, f"{full}."))
    return unknown


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Convert a composed DictConfig into a validated RunConfig (ConfigError on failure)."""
    unknown = _unknown_keys(cfg)
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown config key '{key}'.{_suggest(key)} The schema has no such "
                          "key, so it would be ignored; remove it or fix its spelling.")
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise explain_config_error(exc, []) from None
    if not isinstance(run, RunConfig):
        raise ConfigError("the config does not describe a run: its defaults list must start "
                          "with `run_schema` (copy a shipped recipe with `finetune cp`).")
    if run.recipe not in recipe_names():
        raise ConfigError(f"recipe={run.recipe!r} in the config names no recipe. Recipes: "
                          f"{', '.join(recipe_names())}.")
    validate_run_config(run)
    return run


def compose_run_config(recipe: str, overrides: list[str]) -> RunConfig:
    """Compose, type-check and validate a recipe's config with command-line overrides."""
    return to_run_config(compose_dict(recipe, overrides))


def _schema_at(full_key: str) -> type | None:
    """The dataclass that holds `full_key`'s last part (e.g. 'optim.lrr' -> OptimConfig)."""
    parts = [p for p in full_key.split(".") if p]
    node: type = RunConfig
    for part in parts[:-1]:
        match = {f.name: f for f in fields(node)}.get(part)
        if match is None:
            return None
        sub = GROUP_SCHEMAS.get(part) if node is RunConfig else None
        if sub is None or not is_dataclass(sub):
            return None
        node = sub
    return node


def _choice_at(full_key: str) -> tuple[type[Choice], bool] | None:
    """(the Enum of a Choice field, whether null is allowed), or None for another field."""
    schema = _schema_at(full_key)
    if schema is None:
        return None
    kind = typing.get_type_hints(schema).get(full_key.rsplit(".", 1)[-1])
    members = [t for t in typing.get_args(kind) if t is not NoneType] or [kind]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], Choice):
        return members[0], NoneType in typing.get_args(kind)
    return None


def _bad_choice(full_key: str, value: object, choice: type[Choice], nullable: bool,
                where: str) -> ConfigError:
    allowed = [member.value for member in choice] + (["null"] if nullable else [])
    shown = str(value).lower() if isinstance(value, bool) else value
    text = f"{full_key}={shown}{where} is not valid. Use one of: {', '.join(allowed)}."
    if isinstance(value, bool):  # YAML 1.1, which OmegaConf reads, takes on/off/yes/no as bools
        return ConfigError(f"{text} The value was read as a boolean: in a YAML file, quote "
                           "on, off, yes and no (e.g. \"off\").")
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
    return ConfigError(text + (f" Did you mean '{close[0]}'?" if close else ""))


def _suggest(full_key: str) -> str:
    schema = _schema_at(full_key)
    if schema is None:
        return ""
    prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
    names = [f.name for f in fields(schema)]
    close = difflib.get_close_matches(full_key.rsplit(".", 1)[-1], names, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix}{close[0]}'?"
    return f" Valid keys here: {', '.join(prefix + n for n in names)}."


def explain_config_error(exc: BaseException, overrides: list[str]) -> ConfigError:
    """Turn a Hydra/OmegaConf exception into a one-paragraph ConfigError with a fix."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    where = ""
    text = str(exc).strip()
    if text.startswith("In '"):
        where = f" (in config file {text.split(chr(39))[1]}.yaml)"
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        full_key = str(getattr(cause, "full_key", "") or getattr(cause, "key", "") or "")
        return ConfigError(
            f"unknown config key '{full_key}'{where}.{_suggest(full_key)} "
            "Check the spelling; to add a key that is not in the schema on purpose, "
            "the schema must be extended first."
        )
    if isinstance(cause, MissingMandatoryValue):
        full_key = str(getattr(cause, "full_key", "") or "")
        return ConfigError(f"config key '{full_key}' has no value{where}. Set it on the command "
                           f"line, e.g. {full_key}=VALUE.")
    if isinstance(cause, ValidationError):
        full_key = str(getattr(cause, "full_key", "") or "")
        choice = _choice_at(full_key)
        if choice is not None:
            return _bad_choice(full_key, getattr(cause, "value", None), *choice, where)
        first = str(cause).splitlines()[0]
        return ConfigError(f"wrong type for config key '{full_key}'{where}: {first}. "
                           "Give a value of the type the schema expects.")
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Could not find" in text or "not found in" in text or "Could not load" in text:
        return ConfigError(f"{first.rstrip('.')}. Run `finetune ls` to see the config groups "
                           "and options.")
    return ConfigError(f"invalid config or override ({' '.join(overrides)}): {first}")
