"""One training run, top to bottom: plan -> setup -> resume -> fit -> export.

Each step lives in its own module: the kernel plan in `finetune.kernels` (through
`setup.plan_kernels`), the components in `finetune.train.setup`, the checkpoint to resume from in
`finetune.train.run_dir`, the loop and its state in `finetune.train.trainer`, `final/` in
`finetune.adapters.export` and the summary in `finetune.metrics.summary`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.adapters import count_parameters
from finetune.adapters.export import export_final
from finetune.checkpoint import store
from finetune.checkpoint.files import write_json
from finetune.config import config_dict, config_yaml
from finetune.config.schema import RunConfig
from finetune.data.settings import check_settings as check_data_settings
from finetune.kernels import check_choices, format_plan_table
from finetune.metrics.summary import print_summary, run_summary
from finetune.metrics.writers import step_losses
from finetune.train.recipe import Recipe, load_recipe
from finetune.train.run_dir import (
    FreshRunDir,
    check_output_dir,
    default_output_dir,
    open_resume,
    start_run_files,
)
from finetune.train.setup import build_accelerator, plan_kernels, setup
from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from finetune.train.trainer import Trainer

logger = logging.getLogger(__name__)


def run_recipe(cfg: RunConfig) -> int:
    """Run the recipe named by `cfg.recipe`; return the process exit code."""
    return run_training(cfg, load_recipe(cfg.recipe))


def check_before_work(cfg: RunConfig, recipe: Recipe) -> None:
    """The checks that need no model, data or device, so a mistake stops before any work:
    the recipe's fit, the data settings and the kernel names."""
    recipe.check(cfg)
    check_data_settings(cfg.data)
    check_choices(cfg.kernels)


def run_training(cfg: RunConfig, recipe: Recipe) -> int:
    """Train `recipe` as configured; return the exit code (0, or PREEMPTED_EXIT_CODE)."""
    check_before_work(cfg, recipe)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
    fresh_dir = FreshRunDir(run_dir, cfg.resume)
    check_output_dir(run_dir, cfg.resume)
    kernel_plan = plan_kernels(cfg)
    acc = build_accelerator(kernel_plan)
    acc.wait_for_everyone()  # every rank checked output_dir before rank 0 writes into it
    resume = open_resume(run_dir, cfg.resume, config_dict(cfg), force=cfg.resume_force)
    out = print if acc.is_main_process else (lambda *a, **k: None)
    out(f"finetune {cfg.recipe}: output_dir={run_dir}")
    out(format_plan_table(kernel_plan))
    try:
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            store.remove_stale_tmp(run_dir)
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        saved_run_id = resume.checkpoint.state.progress.get("wandb_run_id") if resume else None
        parts = setup(cfg, kernel_plan, recipe, acc, run_dir=run_dir, config=config_dict(cfg),
                      logger_run_id=saved_run_id)
        trainer = Trainer(cfg, parts, recipe, run_dir=run_dir, kernel_plan=kernel_plan,
                          config_yaml=config_yaml(cfg))
        if resume is not None:
            trainer.load_state_dict(resume.checkpoint.state, source=resume.checkpoint.path)
        # Only now, with the resume accepted, does the run directory change.
        history_complete = True
        if acc.is_main_process:
            history_complete = start_run_files(run_dir, trainer.state.step,
                                               config_yaml=config_yaml(cfg),
                                               kernel_plan=kernel_plan.to_dict())
        acc.wait_for_everyone()
    except BaseException:
        if acc.is_main_process:
            fresh_dir.restore()
        raise
    if resume is not None:
        out(f"resumed from {resume.checkpoint.path} at step {trainer.state.step}")
        for change in resume.allowed_changes:
            out(f"  changed on resume: {change}")
        for change in resume.forced_changes:
            out(f"  FORCED on resume (resume_force=true): {change}")
    _print_start(out, cfg, parts, trainer.state.step)

    try:
        result = trainer.fit()
        if result.stopped_by == "preempted":
            if acc.is_main_process:
                (run_dir / PREEMPTED_MARKER).write_text(f"step {trainer.state.step}\n")
            out(f"preempted at step {trainer.state.step}: checkpoint saved; rerun with "
                f"resume=auto to continue (exit code {PREEMPTED_EXIT_CODE})")
            return PREEMPTED_EXIT_CODE
        if cfg.trainer.save_every_n_steps or cfg.trainer.save_every_minutes:
            trainer.save_checkpoint()
        if acc.is_main_process:
            final = export_final(parts.unwrapped, parts.tokenizer, run_dir,
                                 chat_template=parts.data.chat_template)
            summary = run_summary(
                trainer.state.to_dict(), step_losses(run_dir / "metrics.jsonl"),
                parts.data.stats.to_dict(), total_steps=parts.total_steps,
                world_size=acc.num_processes, device=acc.device,
                resume_changes=resume.allowed_changes if resume else [],
                forced_changes=resume.forced_changes if resume else [],
                history_complete=history_complete)
            write_json(run_dir / "summary.json", summary)
            for tracker in parts.loggers:
                tracker.finish(summary)
            print_summary(out, summary, final)
        acc.wait_for_everyone()
        return 0
    finally:
        trainer.close()
        acc.end_training()


def _print_start(out, cfg: RunConfig, parts, start_step: int) -> None:
    trainable, total = count_parameters(parts.unwrapped)
    world = parts.accelerator.num_processes
    out(f"model {cfg.model.name_or_path}: {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({cfg.peft.method}); {world} process(es)")
    out(f"data: {json.dumps(parts.data.stats.to_dict(), sort_keys=True)}")
    out(f"steps: {start_step} -> {parts.total_steps}; micro_batch {cfg.trainer.micro_batch_size} "
        f"x accum {cfg.trainer.grad_accum_steps} x {world} process(es); "
        f"lr {cfg.optim.lr} {cfg.optim.scheduler}")


__all__ = ["check_before_work", "run_recipe", "run_training"]
