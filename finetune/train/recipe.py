"""The recipe interface: what a recipe states about itself, and how a run finds it.

A recipe (a module in `finetune.recipes` with a primary config of the same name) defines one
`RECIPE = Recipe(...)`. It holds only what is the recipe's own; the loop, checkpoints, metrics
and export are shared and live in `finetune.train`. See `finetune/recipes/__init__.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from finetune.errors import ConfigError
from finetune.train.loss import LossFn, trained_tokens

if TYPE_CHECKING:
    from finetune.config.schema import RunConfig

RECIPE_PACKAGE = "finetune.recipes"

# (cfg, policy model before wrapping, *, data, plan, device) -> extra models by name, handed to
# the loss as keywords.
ExtraModels = Callable[..., Mapping[str, torch.nn.Module]]


@dataclass(frozen=True)
class Recipe:
    """What one recipe states about itself.

    Attributes:
        name: the recipe's name (its module and primary config in `finetune.recipes`).
        loss: `loss(model, batch, num_items, **extra_models)` -> a `torch.Tensor`, or a
            `LossOutput` whose metrics are logged each step (see `finetune.train.loss`).
        trains: "adapter" when the recipe trains a peft adapter (peft.method must name one),
            "all" when every weight trains (peft.method must be none).
        data_formats: the data formats the recipe can train on; empty means any.
        metrics: names of the extra per-step metrics its loss reports, in log order.
        extra_models: builds models the loss needs besides the policy (e.g. a frozen
            reference); they reach the loss as keyword arguments of the same names.
        num_items: what the loss is normalised by, counted on one micro-batch (default: its
            trained tokens; a preference recipe counts pairs). The loop sums it over the whole
            accumulation window and every rank and hands that sum to the loss.
    """

    name: str
    loss: LossFn
    trains: str
    data_formats: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    extra_models: ExtraModels | None = field(default=None)
    num_items: Callable[[dict], int] = trained_tokens
    pairs: bool = False  # the data comes as chosen/rejected pairs (finetune.data.preference)

    def check(self, cfg: RunConfig) -> None:
        """Refuse a config this recipe cannot run (ConfigError naming the fix)."""
        method = str(cfg.peft.method)
        if self.trains == "adapter" and method == "none":
            raise ConfigError(
                f"recipe {self.name} trains an adapter, but peft.method=none. Choose an adapter "
                "(peft=lora, peft=dora, peft=rslora or peft=qlora), or run full_sft to train "
                "every weight.")
        if self.trains == "all" and method != "none":
            raise ConfigError(
                f"recipe {self.name} trains every weight, but peft.method={method}. Use "
                "peft=none with it, or run lora_sft to train an adapter.")
        fmt = str(cfg.data.format)
        if self.data_formats and fmt != "auto" and fmt not in self.data_formats:
            raise ConfigError(
                f"recipe {self.name} trains on data.format {' or '.join(self.data_formats)}, "
                f"not {fmt}. Set data.format=auto or one of those.")

    def check_data_format(self, detected: str) -> None:
        """Refuse data whose detected format the recipe cannot train on."""
        bad = [f for f in detected.split("+") if self.data_formats and f not in self.data_formats]
        if bad:
            raise ConfigError(
                f"recipe {self.name} trains on {' or '.join(self.data_formats)} data, but "
                f"data.path holds {bad[0]} rows. Point data.path at such data.")


def load_recipe(name: str) -> Recipe:
    """The `RECIPE` of module `finetune.recipes.<name>` (ConfigError when there is none)."""
    try:
        module = importlib.import_module(f"{RECIPE_PACKAGE}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{RECIPE_PACKAGE}.{name}":
            raise
        raise ConfigError(f"recipe={name!r} names no recipe module in {RECIPE_PACKAGE}. "
                          "`finetune ls` lists the recipes.") from None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{module.__name__} defines no RECIPE = Recipe(...); see the "
                          f"{RECIPE_PACKAGE} docstring for the interface.")
    return recipe
