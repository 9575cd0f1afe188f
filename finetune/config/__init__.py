"""Typed config schemas, their composition with Hydra, and the resolved config a run records."""

from finetune.config.resolved import config_dict, config_yaml

__all__ = ["config_dict", "config_yaml"]
