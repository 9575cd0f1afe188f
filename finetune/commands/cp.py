"""`finetune cp CONFIG DEST`: copy a shipped config (a recipe or GROUP/OPTION) to edit."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from finetune.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `cp`'s arguments."""
    parser.add_argument("config", metavar="CONFIG",
                        help="a recipe (lora_sft) or a group option (trainer/quick)")
    parser.add_argument("dest", metavar="DEST", help="the file to write, or a folder for it")


def run(args: argparse.Namespace) -> int:
    """Copy the config; refuse to overwrite an existing file (ConfigError)."""
    from finetune.config.compose import shipped_config_dir

    name = args.config
    source = shipped_config_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not source.is_file():
        raise ConfigError(f"no shipped config named '{name}'. `finetune ls` lists them "
                          "(recipes by name, group options as group/option).")
    target = Path(args.dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; not overwriting it. Choose another DEST.")
    shutil.copyfile(source, target)
    group = name.split("/")[0]
    hint = (f"run it with `finetune run {target}`" if "/" not in name
            else f"paste its values under `{group}:` in a recipe copy (`finetune cp lora_sft "
                 "my.yaml`) and run that")
    print(f"copied {name} to {target}; {hint}")
    return 0
