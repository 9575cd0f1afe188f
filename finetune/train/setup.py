"""Build every component of a run from its typed config and kernel plan.

`plan_kernels(cfg)` detects the hardware, chooses the kernels and applies the plan's
environment; `setup(cfg, plan, ...)` then builds, in this order, the accelerator, the model
(attention and dtypes from the plan, fused ops, activation checkpointing, adapter, the LoRA
forward, compile), the tokenizer, the data, the optimizer and schedule, the recipe's extra
models and the loggers, and returns them as `Components`. The order is part of the contract:
the seed is set before the adapter's random init, so a run is reproducible.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from finetune.adapters import apply_adapter
from finetune.adapters.qlora import check_qlora, quantization_config
from finetune.config.kernels import KernelsConfig
from finetune.config.schema import RunConfig
from finetune.data import build_data
from finetune.data.collate import mask_bytes
from finetune.errors import ConfigError
from finetune.kernels import (
    KernelPlan,
    apply_env,
    apply_fused_ops,
    apply_lora_kernel,
    apply_loss_head,
    build_optimizer,
    plan,
)
from finetune.kernels.compilation import compile_decoder_layers
from finetune.models import (
    context_length,
    load_model,
    load_model_config,
    load_tokenizer,
    model_facts,
)
from finetune.train.activation_offload import check_activation_offload
from finetune.train.recipe import Recipe
from finetune.train.schedule import build_scheduler

if TYPE_CHECKING:
    from finetune.data import TrainData

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a run trains with. `model` is as accelerate prepared it (DDP-wrapped under
    several processes); `unwrapped` is the model itself."""

    accelerator: Any
    engine: Any  # finetune.distributed.engine: how the strategy wraps, syncs and checkpoints
    model: torch.nn.Module
    tokenizer: Any
    data: TrainData
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    extra_models: dict[str, torch.nn.Module] = field(default_factory=dict)
    # finetune.distributed.choose.StrategyChoice, its estimate made with the data's row length
    strategy: Any = None
    # finetune.distributed.checkpointing.CheckpointingChoice: whether layers recompute, and why
    checkpointing: Any = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def plan_kernels(cfg: RunConfig) -> KernelPlan:
    """Detect the hardware, choose the kernels, and apply the plan's environment variables
    before any CUDA/HIP work or SDPA call reads them."""
    from finetune.hardware import detect

    facts = model_facts(load_model_config(cfg.model))
    kernel_plan = plan(detect(), cfg.kernels, facts, packing=cfg.data.packing)
    if str(cfg.peft.method) == "qlora":
        check_qlora(kernel_plan.hardware)
    check_activation_offload(cfg.trainer.activation_offload, kernel_plan.hardware)
    apply_env(kernel_plan)
    return kernel_plan


def planned_attention(kernels: KernelsConfig, *, packing: bool) -> str:
    """The attention a run with `kernels` would load on this machine (kernels.attention=auto
    resolved by the planner, without its self-checks and without touching the environment):
    it decides the batch layout that `finetune data inspect` shows and `finetune eval` scores."""
    from finetune.hardware import detect

    kernel_plan = plan(detect(), kernels, run_selfcheck=False, packing=packing,
                       prepare_env=lambda env: None)
    return kernel_plan.attn_implementation


def choose_strategy_for(cfg: RunConfig, recipe: Recipe, kernel_plan: KernelPlan):
    """The distributed strategy of this run (`distributed=auto` resolved from the memory
    estimate for this world size), as a finetune.distributed.choose.StrategyChoice. Called
    before the model loads: on the CPU the estimate counts this process's memory then."""
    from finetune.distributed.choose import choose_strategy, workload_from_run

    world, local = _world_size()
    workload = workload_from_run(cfg, load_model_config(cfg.model), kernel_plan,
                                 pairs=recipe.pairs)
    return choose_strategy(cfg.distributed, workload, kernel_plan.hardware, world,
                           local_processes=local)


def strategy_with_data(cfg: RunConfig, kernel_plan: KernelPlan, chosen, data: TrainData):
    """`chosen` (from `choose_strategy_for`) with its memory estimate re-made for the row
    length the data settled on (data.max_seq_len=auto is decided only once the data is read)
    and, for padding-free rows, their mean length: the choice the run prints
    (finetune.distributed.choose.with_data_length)."""
    from finetune.distributed.choose import with_data_length

    stats = data.stats
    mean = stats.tokens / stats.rows if stats.padding_free and stats.tokens and stats.rows else None
    world, local = _world_size()
    return with_data_length(chosen, cfg.distributed, kernel_plan.hardware, world,
                            seq_len=stats.max_seq_len, seq_len_from=stats.max_seq_len_from,
                            mean_row_tokens=mean, local_processes=local)


def _world_size() -> tuple[int, int]:
    """(processes in the run, processes on this machine), as the launcher set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def build_accelerator(kernel_plan: KernelPlan, *, trackers: list | None = None,
                      run_dir: Path | None = None, timeout_s: int | None = None,
                      engine_kwargs: dict | None = None):
    """An accelerate.Accelerator with the plan's mixed precision and collective backend, and
    the experiment trackers (finetune.metrics.trackers.build_trackers) it logs to.
    `timeout_s`: how long a collective waits for a missing rank (distributed.timeout_s);
    `engine_kwargs`: what the strategy's engine adds (a DeepSpeed plugin)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    group = {"backend": kernel_plan.collective}
    if timeout_s:
        group["timeout"] = timedelta(seconds=timeout_s)
    kwargs = {
        "mixed_precision": kernel_plan.mixed_precision,
        "cpu": kernel_plan.hardware.vendor == "cpu",
        "log_with": trackers or None,
        "project_dir": str(run_dir) if run_dir is not None else None,
        # The collective backend only means something with several processes.
        "kwargs_handlers": [InitProcessGroupKwargs(**group)] if distributed else None,
    }
    return Accelerator(**{**kwargs, **(engine_kwargs or {})})


class Runtime(NamedTuple):
    """How this run executes: its distributed strategy (a StrategyChoice, with the memory
    estimate behind it), the engine that applies it, and the Accelerator built for both."""

    strategy: Any
    engine: Any
    accelerator: Any


def build_runtime(cfg: RunConfig, recipe: Recipe, kernel_plan: KernelPlan, *,
                  trackers: list, run_dir: Path) -> Runtime:
    """Strategy -> engine -> accelerator, before the model loads: the strategy from the memory
    estimate (`choose_strategy_for`), its engine (finetune.distributed.engine), and an
    Accelerator with the engine's settings and the run's trackers."""
    from finetune.distributed.engine import build_engine

    strategy = choose_strategy_for(cfg, recipe, kernel_plan)
    engine = build_engine(str(strategy.strategy), cpu_offload=strategy.cpu_offload,
                          reshard_after_forward=cfg.distributed.reshard_after_forward,
                          reduce_dtype=cfg.distributed.reduce_dtype,
                          vendor=kernel_plan.hardware.vendor,
                          compute_dtype=(kernel_plan.compute_dtype
                                         if kernel_plan.mixed_precision != "no" else None),
                          deepspeed=dict(cfg.distributed.deepspeed))
    engine_kwargs = engine.accelerator_kwargs(
        micro_batch_size=cfg.trainer.micro_batch_size,
        grad_accum_steps=cfg.trainer.grad_accum_steps,
        mixed_precision=kernel_plan.mixed_precision, max_grad_norm=cfg.trainer.max_grad_norm)
    accelerator = build_accelerator(kernel_plan, trackers=trackers, run_dir=run_dir,
                                    timeout_s=cfg.distributed.timeout_s,
                                    engine_kwargs=engine_kwargs)
    return Runtime(strategy, engine, accelerator)


def total_steps(cfg: RunConfig, data: TrainData, world_size: int) -> int:
    """trainer.max_steps, or trainer.epochs full passes over the data."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    per_epoch = data.train.samples_per_epoch
    if per_epoch is None:
        raise ConfigError("data.streaming=true has no known length: set trainer.max_steps "
                          "(e.g. trainer.max_steps=1000).")
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * world_size
    return max(1, cfg.trainer.epochs * -(-per_epoch // per_step))


def choose_checkpointing_for(cfg: RunConfig, kernel_plan: KernelPlan, strategy):
    """(gradient checkpointing choice, strategy) for this run, `strategy` being its
    StrategyChoice with the data's row length (`strategy_with_data`); see
    finetune.distributed.checkpointing.with_checkpointing."""
    from finetune.distributed.checkpointing import with_checkpointing

    world, local = _world_size()
    return with_checkpointing(cfg.trainer.gradient_checkpointing, strategy, cfg.distributed,
                              kernel_plan.hardware, world, local_processes=local)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (transformers' non-reentrant
    checkpointing, the inputs' gradient kept on so a frozen embedding still feeds it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _build_model(cfg: RunConfig, kernel_plan: KernelPlan, *, empty: bool = False
                 ) -> torch.nn.Module:
    # Frozen weights load in the plan's base dtype; a full fine-tune trains every weight, which
    # then stay in the trainable dtype (fp32): bf16 weights would lose updates smaller than
    # their rounding step. `empty`: on the meta device, weights from rank 0 (engine.prepare).
    full = str(cfg.peft.method) == "none"
    quantization = (quantization_config(kernel_plan.compute_dtype)
                    if str(cfg.peft.method) == "qlora" else None)
    model = load_model(cfg.model, attn_implementation=kernel_plan.attn_implementation,
                       dtype=kernel_plan.trainable_dtype if full else kernel_plan.base_dtype,
                       quantization=quantization, empty=empty and quantization is None)
    apply_fused_ops(model, kernel_plan.fused_ops)
    apply_loss_head(model, kernel_plan.loss_head)
    if cfg.trainer.gradient_checkpointing is True:  # auto: decided in setup, once data is read
        enable_checkpointing(model)
    model = apply_adapter(model, cfg.peft)
    apply_lora_kernel(model, kernel_plan.lora)
    if kernel_plan.compile:
        compile_decoder_layers(model)  # in place: parameter names and keys stay unchanged
    return model


def setup(cfg: RunConfig, kernel_plan: KernelPlan, recipe: Recipe, accelerator, engine, *,
          run_dir: Path, strategy=None) -> Components:
    """Build the run's components on `accelerator`, wrapped by the strategy's `engine` (see the
    module docstring for the order). `strategy` is the StrategyChoice the engine was built
    for (None: chosen here); the components carry it re-made with the data's row length, and
    the gradient checkpointing decided with it (trainer.gradient_checkpointing=auto)."""
    from accelerate.utils import set_seed

    if strategy is None:
        strategy = choose_strategy_for(cfg, recipe, kernel_plan)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # A sharding engine may have only rank 0 read the weights (FullyShard: the others build on
    # the meta device and receive their shards in prepare).
    from_rank0 = getattr(engine, "weights_from_rank0", None)
    empty = bool(from_rank0 and from_rank0(accelerator) and accelerator.process_index != 0)
    model = _build_model(cfg, kernel_plan, empty=empty)
    # The first process of each node fills the tokenized cache; the node's others then read it.
    with accelerator.local_main_process_first():
        data = build_data(cfg.data, tokenizer, attention=kernel_plan.attn_implementation,
                          seed=cfg.seed, micro_batch_size=cfg.trainer.micro_batch_size,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          mask_dtype=kernel_plan.compute_dtype,
                          max_context=context_length(model.config), pairs=recipe.pairs,
                          device=accelerator.device)
    mask = mask_bytes(data.stats.isolation, cfg.trainer.micro_batch_size, data.stats.max_seq_len,
                      kernel_plan.compute_dtype)
    if mask:
        logger.info("packed rows are isolated by a dense [B, 1, T, T] mask: up to %.1f MiB per "
                    "micro-batch, built on %s from the tokens' document ids", mask / 2**20,
                    accelerator.device)
    if recipe.data_formats:
        recipe.check_data_format(data.stats.format)
    strategy = strategy_with_data(cfg, kernel_plan, strategy, data)
    checkpointing, strategy = choose_checkpointing_for(cfg, kernel_plan, strategy)
    if checkpointing.enabled and cfg.trainer.gradient_checkpointing is not True:
        enable_checkpointing(model)
    steps = total_steps(cfg, data, accelerator.num_processes)
    extra = (dict(recipe.extra_models(cfg, model, data=data, plan=kernel_plan,
                                      device=accelerator.device))
             if recipe.extra_models else {})

    def make_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return build_optimizer(kernel_plan.optimizer, params, lr=cfg.optim.lr,
                               betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                               weight_decay=cfg.optim.weight_decay)

    # The engine builds the optimizer: a sharded model's parameters exist only once sharded.
    model, optimizer = engine.prepare(accelerator, model, make_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    return Components(accelerator=accelerator, engine=engine, model=model, tokenizer=tokenizer,
                      data=data, optimizer=optimizer, scheduler=scheduler, total_steps=steps,
                      extra_models=extra, strategy=strategy, checkpointing=checkpointing)
