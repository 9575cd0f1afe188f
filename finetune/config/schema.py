"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Defaults live here and only here; the YAML files under configs/ select options and hold what
differs. Struct mode makes an unknown key an error before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from finetune.config.choice import Choice
from finetune.config.data import DataConfig
from finetune.config.distributed import DistributedConfig
from finetune.config.dpo import DpoConfig
from finetune.config.eval import EvalConfig
from finetune.config.kernels import KernelsConfig


class PeftMethod(Choice):
    """The adapter type; `none` trains every weight."""

    lora = "lora"
    dora = "dora"
    rslora = "rslora"
    qlora = "qlora"
    none = "none"


class PeftBias(Choice):
    """Which bias terms the adapter trains (peft's `bias`)."""

    none = "none"
    all = "all"
    lora_only = "lora_only"


class Scheduler(Choice):
    """The learning-rate shape after warmup."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class OnNan(Choice):
    """What a non-finite loss does: stop the run, or skip the step and count it."""

    stop = "stop"
    skip = "skip"


class KeepBestBy(Choice):
    """The metric whose best checkpoint is kept besides the last `keep_last_n`."""

    eval_loss = "eval_loss"


class LoggerName(Choice):
    """The trackers metrics can go to besides metrics.jsonl and the console (each one a switch
    of `LoggerConfig`, turned on by the `logger` group option of the same name)."""

    wandb = "wandb"
    tensorboard = "tensorboard"
    mlflow = "mlflow"


class LoggerMode(Choice):
    """W&B's mode. `online` falls back to `offline` (with a line saying how to sync later) when
    there is no API key or the W&B host cannot be reached."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


class DisplayMode(Choice):
    """The console display: `live` redraws one status block in place, `plain` prints a line
    every `trainer.log_every_n_steps` steps, `auto` is live on a terminal and plain elsewhere
    (CI, SLURM logs, a pipe)."""

    auto = "auto"
    live = "live"
    plain = "plain"


@dataclass
class ModelConfig:
    """The base model: `tiny` (built in), a local Hugging Face folder, or a hub id."""

    name_or_path: str = "???"
    revision: Any = None
    trust_remote_code: bool = False
    cache_dir: Any = None  # where the built-in tiny model is written; None: ~/.cache/finetune


@dataclass
class PeftConfig:
    """The adapter; `method: none` trains every weight (full fine-tune)."""

    method: PeftMethod = PeftMethod.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or all-linear
    bias: PeftBias = PeftBias.none


@dataclass
class TrainerConfig:
    """The training loop: batch shape, length, schedule, evaluation and checkpoint cadence."""

    max_steps: int = -1  # -1: run `epochs` full passes
    epochs: int = 1
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    # auto: on only when the memory estimate does not fit the device (or the host's free
    # memory on a CPU); true | false as said
    gradient_checkpointing: Any = "auto"
    activation_offload: bool = False  # saved activations to pinned host memory (GPUs)
    eval_every_n_steps: int = 0  # 0: only at the end
    eval_max_batches: int = 50
    save_every_n_steps: int = 0  # 0: only at the end
    save_every_minutes: float = 0.0
    keep_last_n: int = 0  # 0: keep all
    keep_best_by: KeepBestBy | None = None
    log_every_n_steps: int = 1
    prefetch: int = 2  # micro-batches built ahead on a background thread; 0: built in the step
    on_nan: OnNan = OnNan.stop


@dataclass
class OptimConfig:
    """AdamW hyper-parameters and the learning-rate schedule."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: Scheduler = Scheduler.cosine
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl and the console display.

    One switch per tracker, so Hydra's list of group options composes: `logger=wandb` turns on
    W&B, `logger=[wandb,tensorboard]` both (the same as `logger.wandb=true
    logger.tensorboard=true`), `logger=console` none.
    """

    wandb: bool = False
    tensorboard: bool = False  # event files in OUTPUT_DIR/tb/
    mlflow: bool = False  # MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlruns
    display: DisplayMode = DisplayMode.auto
    project: str = "finetune"  # W&B project, MLflow experiment
    entity: Any = None  # W&B team or user
    run_name: Any = None  # W&B and MLflow run name; None: the output directory's name
    mode: LoggerMode = LoggerMode.online  # W&B
    tags: list[str] = field(default_factory=list)  # W&B and MLflow

    def trackers(self) -> list[LoggerName]:
        """The trackers switched on, in a fixed order."""
        return [name for name in LoggerName if getattr(self, name.value)]


@dataclass
class RunConfig:
    """One run: every group plus the run-level keys."""

    recipe: str = "???"
    output_dir: Any = None  # None: runs/<recipe>-<timestamp>
    resume: Any = None  # None | auto | path to a checkpoint
    resume_force: bool = False
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "peft": PeftConfig,
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "kernels": KernelsConfig,
    "distributed": DistributedConfig,
    "logger": LoggerConfig,
    "dpo": DpoConfig,
}


def register_schemas() -> None:
    """Register the run schema (`run_schema`) and each group's (`<group>/schema`), once per
    process: Hydra's store keeps them, and building them again costs a third of a compose."""
    cs = ConfigStore.instance()
    if "run_schema.yaml" in cs.repo:
        return
    cs.store(name="run_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
