"""The resolved run config as plain values: the dict and YAML a run records and `validate` prints.

Enum members become their string values, so config.yaml reads `method: lora` and the dict is
JSON-able (checkpoint manifests, W&B) and compares equal to a config.yaml loaded back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.config.schema import RunConfig


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """`cfg` as nested dicts and lists of str, int, float, bool and None."""
    from omegaconf import OmegaConf  # here, not at the top: `finetune.config` imports without it

    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    assert isinstance(container, dict)  # a RunConfig is a mapping
    return container


def config_yaml(cfg: RunConfig) -> str:
    """`cfg` as YAML, keys in schema order (the run directory's config.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
