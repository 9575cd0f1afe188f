"""Build a real Trainer in-process on the built-in tiny model (a few seconds each)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.config.compose import compose_run_config
from finetune.distributed.engine import build_engine
from finetune.metrics.monitor import RunMonitor
from finetune.train.recipe import Recipe, load_recipe
from finetune.train.setup import build_accelerator, plan_kernels, setup
from finetune.train.trainer import Trainer

SMALL = ["trainer.micro_batch_size=2", "data.max_seq_len=48", "trainer.eval_every_n_steps=0",
         "trainer.eval_max_batches=1", "kernels.selfcheck=false"]


@pytest.fixture
def make_trainer(tiny_model_dir: Path) -> Callable[..., Trainer]:
    """make_trainer(run_dir, *overrides, recipe=None, engine="single", config="lora_sft") -> a
    Trainer set up like a real run (engine: the strategy, e.g. fsdp2 on a one-rank process
    group; config: the shipped recipe config composed)."""

    def make(run_dir: Path, *overrides: str, recipe: Recipe | None = None,
             engine: str = "single", config: str = "lora_sft") -> Trainer:
        cfg = compose_run_config(config, [*SMALL, *overrides, f"output_dir={run_dir}"])
        recipe = recipe or load_recipe(cfg.recipe)
        kernel_plan = plan_kernels(cfg)
        acc = build_accelerator(kernel_plan)
        run_dir.mkdir(parents=True, exist_ok=True)
        parts = setup(cfg, kernel_plan, recipe, acc, build_engine(engine), run_dir=run_dir)
        return Trainer(cfg, parts, recipe, run_dir=run_dir, kernel_plan=kernel_plan,
                       config_yaml=f"recipe: {cfg.recipe}\n",
                       monitor=RunMonitor(cfg, run_dir, acc, kernel_plan))

    return make
