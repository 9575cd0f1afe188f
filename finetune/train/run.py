"""One training run, top to bottom: plan -> setup -> resume -> fit -> export.

Each step lives in its own module: the kernel plan in `finetune.kernels` (through
`setup.plan_kernels`), the components in `finetune.train.setup`, the checkpoint to resume from in
`finetune.train.run_dir`, the loop and its state in `finetune.train.trainer`, `final/` in
`finetune.adapters.export` and the summary in `finetune.metrics.summary`.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

from finetune.adapters.export import export_final
from finetune.checkpoint import store
from finetune.checkpoint.files import write_json
from finetune.config import config_dict, config_yaml
from finetune.config.schema import RunConfig
from finetune.data.settings import check_settings as check_data_settings
from finetune.distributed.deepspeed_config import check_settings as check_deepspeed
from finetune.kernels import check_choices
from finetune.metrics.monitor import RunMonitor
from finetune.metrics.progress import task
from finetune.metrics.summary import run_summary
from finetune.metrics.trackers import build_trackers
from finetune.metrics.writers import read_records
from finetune.train.rank_log import rank_log
from finetune.train.recipe import Recipe, load_recipe
from finetune.train.run_dir import (
    FreshRunDir,
    RunDirLock,
    check_output_dir,
    default_output_dir,
    open_resume,
    start_run_files,
)
from finetune.train.setup import build_runtime, plan_kernels, setup
from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from finetune.train.trainer import Trainer
from finetune.train.tuning import tune_kernels

logger = logging.getLogger(__name__)


def run_recipe(cfg: RunConfig) -> int:
    """Run the recipe named by `cfg.recipe`; return the process exit code."""
    return run_training(cfg, load_recipe(cfg.recipe))


def check_before_work(cfg: RunConfig, recipe: Recipe) -> None:
    """The checks that need no model, data or device, so a mistake stops before any work:
    the recipe's fit, the data settings and the kernel names."""
    recipe.check(cfg)
    check_deepspeed(cfg.distributed)
    check_data_settings(cfg.data)
    check_choices(cfg.kernels)


def run_training(cfg: RunConfig, recipe: Recipe) -> int:
    """Train `recipe` as configured; return the exit code (0, or PREEMPTED_EXIT_CODE).

    Global rank 0 holds the run directory's lock from before the directory is checked until
    the run ends, so a second run into it is refused (one launched by `finetune run --nproc`
    already holds it through its launcher)."""
    check_before_work(cfg, recipe)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
    fresh_dir = FreshRunDir(run_dir, cfg.resume)
    lock = RunDirLock(run_dir) if os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock:
        check_output_dir(run_dir, cfg.resume)
        return _train(cfg, recipe, run_dir, fresh_dir)


def _train(cfg: RunConfig, recipe: Recipe, run_dir: Path, fresh_dir: FreshRunDir) -> int:
    # Built before any work, so a missing tracker package stops the run at once; accelerate
    # takes the trackers with the Accelerator, and monitor.start starts them.
    trackers = build_trackers(cfg.logger, run_dir)
    kernel_plan = plan_kernels(cfg)
    strategy, engine, acc = build_runtime(cfg, recipe, kernel_plan, trackers=trackers,
                                          run_dir=run_dir)
    kernel_plan = tune_kernels(cfg, kernel_plan, acc, pairs=recipe.pairs)  # rank 0 decides
    monitor = RunMonitor(cfg, run_dir, acc, kernel_plan)
    acc.wait_for_everyone()  # every rank checked output_dir before rank 0 writes into it
    # Each rank's own log file; only now, when no rank can mistake logs/ for an old run.
    with rank_log(run_dir, acc.process_index):
        try:  # until the first step, a failure leaves a fresh run's directory as it found it
            resume = open_resume(run_dir, cfg.resume, config_dict(cfg), force=cfg.resume_force,
                                 world_size=acc.num_processes)
            monitor.print_plan()
            if acc.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
                store.remove_stale_tmp(run_dir)
                (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
            parts = setup(cfg, kernel_plan, recipe, acc, engine, run_dir=run_dir,
                          strategy=strategy)
            # Said with the row length the data settled on (`finetune validate` shows the whole
            # estimate, for the length it assumes).
            strategy = parts.strategy
            monitor.line(strategy.headline())
            monitor.line(parts.checkpointing.headline())
            if strategy.fits is False:
                logger.warning("%s", strategy.reason)
            trainer = Trainer(cfg, parts, recipe, run_dir=run_dir, kernel_plan=kernel_plan,
                              config_yaml=config_yaml(cfg), monitor=monitor)
            if resume is not None:
                trainer.load_state_dict(resume.checkpoint.state, source=resume.checkpoint.path)
                trainer.state.record_resume(resume.allowed_changes, resume.forced_changes)
            # Only now, with the resume accepted, does the run directory change.
            history_complete = True
            if acc.is_main_process:
                history_complete = start_run_files(run_dir, trainer.state.step,
                                                   config_yaml=config_yaml(cfg),
                                                   kernel_plan=kernel_plan.to_dict())
            acc.wait_for_everyone()
            if resume is not None:
                monitor.line(f"resumed from {resume.checkpoint.path} at step "
                             f"{trainer.state.step}")
                for change in resume.allowed_changes:
                    monitor.line(f"  changed on resume: {change}")
                for change in resume.forced_changes:
                    monitor.line(f"  FORCED on resume (resume_force=true): {change}")
            # The trackers start here: one that fails (a bad URI, no key) also leaves no trace.
            monitor.start(parts.unwrapped, total_steps=parts.total_steps,
                          start_step=trainer.state.step, data_stats=parts.data.stats.to_dict(),
                          config=config_dict(cfg),
                          resumed=resume.checkpoint.state.progress if resume else None)
        except BaseException:
            monitor.close()
            if acc.is_main_process:
                fresh_dir.restore()
            raise

        try:
            result = trainer.fit()
            if result.stopped_by == "preempted":
                if acc.is_main_process:
                    (run_dir / PREEMPTED_MARKER).write_text(f"step {trainer.state.step}\n")
                monitor.line(f"preempted at step {trainer.state.step}: checkpoint saved; rerun "
                             f"with resume=auto to continue (exit code {PREEMPTED_EXIT_CODE})")
                return PREEMPTED_EXIT_CODE
            _export(cfg, trainer, run_dir, history_complete=history_complete)
            return 0
        finally:
            trainer.close()
            acc.end_training()


def _export(cfg: RunConfig, trainer: Trainer, run_dir: Path, *, history_complete: bool) -> None:
    """After the last step: a last checkpoint where checkpoints are on, final/ (gathered from
    the shards on every rank, written by rank 0), summary.json and the end of the report."""
    parts, acc, monitor = trainer.parts, trainer.acc, trainer.monitor
    if cfg.trainer.save_every_n_steps or cfg.trainer.save_every_minutes:
        trainer.save_checkpoint()
    weights = parts.engine.full_state(parts.unwrapped)
    if acc.is_main_process:
        with task("writing the final model"):
            final = export_final(parts.unwrapped, parts.tokenizer, run_dir,
                                 chat_template=parts.data.chat_template, weights=weights)
        records = read_records(run_dir / "metrics.jsonl")
        summary = run_summary(
            trainer.state.to_dict(), [r["loss"] for r in records if "loss" in r],
            parts.data.stats.to_dict(), total_steps=parts.total_steps,
            world_size=acc.num_processes, device=acc.device,
            resume_changes=trainer.state.resume_changes,
            forced_changes=trainer.state.resume_forced_changes,
            history_complete=history_complete, records=records)
        write_json(run_dir / "summary.json", summary)
        monitor.finish(summary, final)
    acc.wait_for_everyone()


__all__ = ["check_before_work", "run_recipe", "run_training"]
