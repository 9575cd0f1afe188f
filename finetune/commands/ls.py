"""`finetune ls`: the recipes and the options of each config group."""

from __future__ import annotations

import argparse
import importlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ls` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print each recipe with its one-line description, then each group's options."""
    from finetune.config.compose import recipe_names, shipped_config_dir

    root = shipped_config_dir()
    print("recipes:")
    for name in recipe_names():
        module = importlib.import_module(f"finetune.recipes.{name}")
        doc = (module.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("\nconfig groups (select with GROUP=OPTION, copy with `finetune cp GROUP/OPTION`):")
    for group in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(p.stem for p in group.glob("*.yaml"))
        if options:
            print(f"  {group.name + '/':<10} {', '.join(options)}")
    return 0
