"""Set up and run one training run: plan, model, adapter, data, optimizer, resume, loop, export.

This is the whole flow of DESIGN.md's "How a run flows"; recipes call `run_training` with their
loss function and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.adapters import apply_adapter, count_parameters
from finetune.checkpoint import store
from finetune.checkpoint.compat import check_resume_compatible
from finetune.checkpoint.files import write_json
from finetune.config.schema import RunConfig
from finetune.errors import CheckpointError, ConfigError
from finetune.metrics.writers import WandbLogger, step_losses, truncate_metrics
from finetune.models import load_model, load_model_config, load_tokenizer, model_facts
from finetune.train.loss import LossFn
from finetune.train.run_dir import check_output_dir, default_output_dir, find_resume_checkpoint
from finetune.train.schedule import build_scheduler
from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from finetune.train.trainer import LoopState, Trainer

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def config_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _plan(cfg: RunConfig):
    """Detect the hardware and choose kernels; set the plan's env vars before CUDA/HIP work."""
    from finetune.hardware import detect
    from finetune.kernels import apply_env, plan

    facts = model_facts(load_model_config(cfg.model))
    profile = detect()
    kernel_plan = plan(profile, cfg.kernels, facts)
    apply_env(kernel_plan)
    return profile, kernel_plan


def _accelerator(profile, plan_dict: dict):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = plan_dict["kernels"]["precision"]["choice"]
    collective = plan_dict["kernels"]["collective"]["choice"]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        cpu=profile.vendor == "cpu",
        # The plan's collective backend (gloo/nccl/xccl); only meaningful with several processes.
        kwargs_handlers=[InitProcessGroupKwargs(backend=collective)] if distributed else None,
    )


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Copy checkpointed trainable weights in; refuse another model's or adapter shape's."""
    own = trainable_state(model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    bad_shape = [n for n in own if n in tensors and tensors[n].shape != own[n].shape]
    if missing or extra or bad_shape:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {extra[:3]}" if extra else f"shape differs for {bad_shape[:3]}")
        raise CheckpointError(
            f"checkpoint {checkpoint} was saved from another model or adapter shape ({detail}). "
            "Resume with the same model and peft settings, or start a new output_dir.")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name].to(param.dtype))


def _total_steps(cfg: RunConfig, data, world: int) -> int:
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    per_epoch = data.train.samples_per_epoch
    if per_epoch is None:
        raise ConfigError("data.streaming=true has no known length: set trainer.max_steps "
                          "(e.g. trainer.max_steps=1000).")
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * world
    return max(1, cfg.trainer.epochs * -(-per_epoch // per_step))


def _export_final(model, tokenizer, run_dir: Path) -> Path:
    """Write final/ atomically: the adapter in peft format (or the full model) + tokenizer."""
    final = run_dir / "final"
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        old = run_dir / ".final-old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_training(cfg: RunConfig, loss_fn: LossFn) -> int:
    """Train as configured; return the process exit code (0, or PREEMPTED_EXIT_CODE)."""
    from accelerate.utils import set_seed

    from finetune.data import build_data
    from finetune.kernels import apply_fused_ops, build_optimizer, format_plan_table

    run_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
    check_output_dir(run_dir, cfg.resume)
    profile, kernel_plan = _plan(cfg)
    plan_dict = kernel_plan.to_dict()
    acc = _accelerator(profile, plan_dict)
    acc.wait_for_everyone()  # every rank checked output_dir before rank 0 writes into it
    resume_from = find_resume_checkpoint(run_dir, cfg.resume)
    checkpoint = store.load_checkpoint(resume_from) if resume_from else None
    allowed_changes, forced_changes = [], []
    if checkpoint is not None:
        allowed_changes, forced_changes = check_resume_compatible(
            checkpoint.config_yaml, config_dict(cfg), force=cfg.resume_force,
            checkpoint=str(checkpoint.path))
    out = print if acc.is_main_process else (lambda *a, **k: None)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        store.remove_stale_tmp(run_dir)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg), encoding="utf-8")
        write_json(run_dir / "kernel_plan.json", plan_dict)
    out(f"finetune {cfg.recipe}: output_dir={run_dir}")
    out(format_plan_table(kernel_plan))

    set_seed(cfg.seed)
    attention = plan_dict["kernels"]["attention"]["choice"]
    precision = plan_dict["kernels"]["precision"]
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, attn_implementation=attention,
                       dtype=DTYPES[precision.get("base_dtype", precision["choice"])])
    apply_fused_ops(model, kernel_plan)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    base_params = sum(p.numel() for p in model.parameters())
    model = apply_adapter(model, cfg.peft)
    trainable, total = count_parameters(model)
    if plan_dict["kernels"]["compile"]["choice"] == "on":
        model.compile()  # in place: parameter names and state_dict keys stay unchanged
    with acc.main_process_first():  # rank 0 fills the tokenized cache; the others read it
        data = build_data(cfg.data, tokenizer, attention=attention, seed=cfg.seed,
                          micro_batch_size=cfg.trainer.micro_batch_size,
                          rank=acc.process_index, world_size=acc.num_processes,
                          mask_dtype=DTYPES[precision["choice"]])
    total_steps = _total_steps(cfg, data, acc.num_processes)
    optimizer = build_optimizer(
        plan_dict["kernels"]["optimizer"]["choice"], [p for p in model.parameters()
                                                      if p.requires_grad],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    unwrapped = acc.unwrap_model(model)

    state = LoopState()
    wandb_id = None
    if checkpoint is not None:
        load_trainable(unwrapped, checkpoint.trainable, checkpoint.path)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        saved = checkpoint.state
        data.train.load_state_dict(saved["data"])
        state = LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"],
                          elapsed_s=saved["elapsed_s"], nan_skipped=saved["nan_skipped"],
                          best_eval_loss=saved.get("best_eval_loss"),
                          best_step=saved.get("best_step"),
                          last_eval_loss=saved.get("last_eval_loss"))
        wandb_id = saved.get("wandb_run_id")
        rng = store.read_rank_rng(checkpoint.path, acc.process_index)
        if rng is not None:
            store.restore_rng(*rng)
        else:
            logger.warning("checkpoint has no RNG state for rank %d (world size changed); "
                           "seeding it from seed+rank+step", acc.process_index)
            set_seed(cfg.seed + acc.process_index + state.step)
        if acc.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", state.step)
        out(f"resumed from {checkpoint.path} at step {state.step}")
        for change in allowed_changes:
            out(f"  changed on resume: {change}")
        for change in forced_changes:
            out(f"  FORCED on resume (resume_force=true): {change}")

    wandb = None
    if cfg.logger.name == "wandb" and acc.is_main_process:
        wandb = WandbLogger(cfg.logger, run_dir, config_dict(cfg), wandb_id)
        wandb_id = wandb.run_id

    out(f"model {cfg.model.name_or_path}: {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({cfg.peft.method}); {acc.num_processes} process(es)")
    out(f"data: {json.dumps(data.stats.to_dict(), sort_keys=True)}")
    out(f"steps: {state.step} -> {total_steps}; micro_batch {cfg.trainer.micro_batch_size} x "
        f"accum {cfg.trainer.grad_accum_steps} x {acc.num_processes} process(es); "
        f"lr {cfg.optim.lr} {cfg.optim.scheduler}")

    def payload(loop_state: LoopState) -> store.CheckpointPayload:
        return store.CheckpointPayload(
            trainable=trainable_state(unwrapped),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=acc.scaler.state_dict() if acc.scaler is not None else None,
            state={"step": loop_state.step, "tokens_seen": loop_state.tokens_seen,
                   "elapsed_s": loop_state.elapsed_s, "nan_skipped": loop_state.nan_skipped,
                   "best_eval_loss": loop_state.best_eval_loss,
                   "best_step": loop_state.best_step,
                   "last_eval_loss": loop_state.last_eval_loss,
                   "data": data.train.state_dict(), "world_size": acc.num_processes,
                   "wandb_run_id": wandb_id},
            config_yaml=config_yaml(cfg),
            kernel_plan=plan_dict,
        )

    peak = profile.peak_bf16_tflops
    flops_per_token = (6 if cfg.peft.method == "none" else 4) * base_params
    trainer = Trainer(
        cfg=cfg, accelerator=acc, model=model, optimizer=optimizer, scheduler=scheduler,
        data=data, loss_fn=loss_fn, run_dir=run_dir, total_steps=total_steps, state=state,
        checkpoint_payload=payload, flops_per_token=flops_per_token,
        peak_flops=peak * 1e12 if (peak and precision["choice"] == "bf16") else None,
        wandb=wandb)
    try:
        result = trainer.fit()
        if result.stopped_by == "preempted":
            if acc.is_main_process:
                (run_dir / PREEMPTED_MARKER).write_text(f"step {state.step}\n")
            out(f"preempted at step {state.step}: checkpoint saved; rerun with resume=auto to "
                f"continue (exit code {PREEMPTED_EXIT_CODE})")
            return PREEMPTED_EXIT_CODE
        if cfg.trainer.save_every_n_steps or cfg.trainer.save_every_minutes:
            trainer.save_checkpoint()
        if acc.is_main_process:
            final = _export_final(unwrapped, tokenizer, run_dir)
            losses = step_losses(run_dir / "metrics.jsonl")  # the whole run, across resumes
            summary = _summary(state, losses, data, total_steps, acc, allowed_changes,
                               forced_changes)
            write_json(run_dir / "summary.json", summary)
            if wandb is not None:
                wandb.finish(summary)
            _print_summary(out, summary, final)
        acc.wait_for_everyone()
        return 0
    finally:
        trainer.close()
        acc.end_training()


def _tenth_mean(values: list[float], last: bool) -> float | None:
    if not values:
        return None
    n = max(1, len(values) // 10)
    part = values[-n:] if last else values[:n]
    return sum(part) / len(part)


def _summary(state: LoopState, losses: list[float], data, total_steps: int, acc,
             allowed: list[str], forced: list[str]) -> dict:
    stats = data.stats.to_dict()
    return {
        "steps": state.step,
        "total_steps": total_steps,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": round(state.elapsed_s, 3),
        "trained_tokens_per_s": state.tokens_seen / state.elapsed_s if state.elapsed_s else None,
        "first_loss": _tenth_mean(losses, last=False),
        "last_loss": _tenth_mean(losses, last=True),
        "eval_loss": state.last_eval_loss,
        "best_eval_loss": state.best_eval_loss,
        "nan_skipped_steps": state.nan_skipped,
        "skipped_rows": stats.get("skipped_rows", 0),
        "truncated_rows": stats.get("truncated_rows", 0),
        "dropped_rows": stats.get("dropped_rows", 0),
        "data": stats,
        "peak_memory_gb": round(_peak_memory_gb(acc.device), 3),
        "world_size": acc.num_processes,
        "resume_changes": allowed,
        "resume_forced_changes": forced,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def _print_summary(out, summary: dict, final: Path) -> None:
    first, last = summary["first_loss"], summary["last_loss"]
    drop = f" ({(1 - last / first):.0%} lower)" if first and last else ""
    out("")
    out("done.")
    if first is not None:
        out(f"  loss: {first:.4f} (first tenth) -> {last:.4f} (last tenth){drop}")
    if summary["eval_loss"] is not None:
        out(f"  eval loss: {summary['eval_loss']:.4f}")
    out(f"  steps: {summary['steps']}, trained tokens: {summary['tokens_seen']}, "
        f"time: {summary['elapsed_s']:.1f} s")
    if summary["skipped_rows"]:
        out(f"  skipped rows: {summary['skipped_rows']} (see summary.json)")
    out(f"  final model: {final}")


def run_recipe(cfg: RunConfig) -> int:
    """Run the recipe named by `cfg.recipe`; return the process exit code."""
    import importlib

    return importlib.import_module(f"finetune.recipes.{cfg.recipe}").train(cfg)


__all__ = ["run_recipe", "run_training", "config_dict", "config_yaml"]
