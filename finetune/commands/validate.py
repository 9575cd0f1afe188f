"""`finetune validate RECIPE [OVERRIDES...]`: compose and check a config, print it resolved."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `validate`'s arguments; overrides may come in any order."""
    parser.add_argument("recipe", metavar="RECIPE",
                        help="a shipped recipe (see `finetune ls`) or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="OVERRIDES",
                        help="Hydra syntax, as for `finetune run`")


def run(args: argparse.Namespace) -> int:
    """Print the resolved config.yaml a run would write; a bad config raises ConfigError."""
    from finetune.config import config_yaml
    from finetune.config.compose import compose_run_config
    from finetune.train.recipe import load_recipe
    from finetune.train.run import check_before_work

    cfg = compose_run_config(args.recipe, args.overrides)
    check_before_work(cfg, load_recipe(cfg.recipe))
    print(config_yaml(cfg), end="")
    print(f"# ok: {args.recipe} composes and validates", file=sys.stderr)
    return 0
