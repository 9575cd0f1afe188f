"""Run one optimizer step of the lora_sft recipe on the tiny model and write the gradients it
clips and applies (before clipping) to OUT: `python _window_gradients.py OUT RUN_DIR STRATEGY
OVERRIDES...`. Launched once per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) by
tests/e2e/test_loss_ranks.py; rank 0 writes OUT."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def window_gradients(run_dir: Path, strategy: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The trainable weights' gradients of the first step, as the optimizer gets them."""
    from finetune.config.compose import compose_run_config
    from finetune.distributed.engine import build_engine
    from finetune.metrics.monitor import RunMonitor
    from finetune.train.recipe import load_recipe
    from finetune.train.setup import build_accelerator, plan_kernels, setup
    from finetune.train.trainer import Trainer

    cfg = compose_run_config("lora_sft", [*overrides, "trainer.max_steps=1",
                                          f"output_dir={run_dir}"])
    recipe = load_recipe(cfg.recipe)
    plan = plan_kernels(cfg)
    acc = build_accelerator(plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = setup(cfg, plan, recipe, acc, build_engine(strategy), run_dir=run_dir)
    trainer = Trainer(cfg, parts, recipe, run_dir=run_dir, kernel_plan=plan,
                      config_yaml="recipe: lora_sft\n", monitor=RunMonitor(cfg, run_dir, acc, plan))
    grads: dict[str, torch.Tensor] = {}
    clip = trainer.engine.clip_grad_norm

    def record_then_clip(accelerator, params, max_norm):
        grads.update({name: p.grad.detach().clone()
                      for name, p in parts.unwrapped.named_parameters() if p.requires_grad})
        return clip(accelerator, params, max_norm)

    trainer.engine.clip_grad_norm = record_then_clip
    trainer.fit()
    trainer.close()
    return grads


if __name__ == "__main__":
    import os

    out, run_dir, strategy, *overrides = sys.argv[1:]
    grads = window_gradients(Path(run_dir), strategy, overrides)
    if os.environ.get("RANK", "0") == "0":
        torch.save(grads, out)
    if torch.distributed.is_initialized():  # no rank leaves while the other still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
