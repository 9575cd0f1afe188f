"""DeepSpeed ZeRO stage 2 and 3 (`distributed=deepspeed_zero2|deepspeed_zero3`) through
accelerate's DeepSpeed integration.

`build_config` turns the run's settings into a DeepSpeed config (stage, micro-batch and
accumulation, gradient clipping, the plan's 16-bit mode, fp32 gradient communication, optimizer
offload) and merges `distributed.deepspeed` over it, refusing entries that would contradict the
loop. `DeepSpeedZero` is the engine (see `finetune.distributed.engine`): accelerate wraps the
model in a DeepSpeedEngine, the loop's backward goes through DeepSpeed, and DeepSpeed's step
(norm, clip, skip when the norm is not finite, update) runs where the loop clips. Checkpoints
are DeepSpeed's own: every rank writes its partition into the checkpoint's `deepspeed/` folder,
which resumes on the same number of processes; final/ is written from the fp32 master weights.

DeepSpeed is an optional extra (`pip install 'finetune[deepspeed]'`); this module imports it
only when a DeepSpeed strategy is used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from finetune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
LAYOUT = "layout.json"  # world size and trainable weights of the run that wrote the folder
TAG = "state"
STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}
COMMUNICATION_DTYPES = {"auto": "fp32", "fp32": "fp32", "bf16": "bf16"}

# Entries the loop or another config key owns: a value here would disagree with what the loop
# does, so it is refused with the key to set instead.
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "train_batch_size": "trainer.micro_batch_size and trainer.grad_accum_steps",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "gradient_clipping": "trainer.max_grad_norm",
    "optimizer": "optim.* (the optimizer comes from the kernel plan: kernels.optimizer)",
    "scheduler": "optim.* (the schedule is the run's own)",
}


def deepspeed_available() -> bool:
    """True when the `deepspeed` package can be imported (it is not imported here: importing it
    probes the accelerator)."""
    return importlib.util.find_spec("deepspeed") is not None


def require_deepspeed(strategy: str) -> None:
    """ConfigError when `strategy` is a DeepSpeed one and DeepSpeed is not installed."""
    if strategy in STAGES and not deepspeed_available():
        raise ConfigError(
            f"distributed={strategy} needs DeepSpeed, which is not installed. Install the extra: "
            "pip install 'finetune[deepspeed]', or use distributed=fsdp2 (parameters, gradients "
            "and optimizer state sharded with PyTorch alone).")


def _merge(base: dict, override: Mapping) -> dict:
    """`override` merged into a copy of `base`, nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return merged


def check_overrides(strategy: str, overrides: Mapping, *, reduce_dtype: str = "auto",
                    vendor: str = "cpu") -> None:
    """ConfigError for `distributed.deepspeed` entries that contradict the run: keys another
    setting owns, another ZeRO stage, a gradient norm DeepSpeed would not compute, and 16-bit
    gradient communication on AMD GPUs."""
    for key, instead in OWNED_KEYS.items():
        if key in overrides:
            raise ConfigError(f"distributed.deepspeed.{key}: set {instead} instead; the loop and "
                              "DeepSpeed must agree on it.")
    zero = overrides.get("zero_optimization") or {}
    stage = zero.get("stage", STAGES[strategy])
    if stage != STAGES[strategy]:
        raise ConfigError(
            f"distributed.deepspeed.zero_optimization.stage={stage} contradicts "
            f"distributed={strategy}: choose the stage with distributed=deepspeed_zero{stage} "
            "(stages 2 and 3 are supported) and remove the entry.")
    if zero.get("compute_grad_norm") is False:
        raise ConfigError("distributed.deepspeed.zero_optimization.compute_grad_norm=false: the "
                          "loop logs the gradient norm and checks it is finite; remove the entry.")
    if reduce_dtype not in COMMUNICATION_DTYPES:
        raise ConfigError(f"distributed.reduce_dtype={reduce_dtype!r}: use auto, fp32 or bf16.")
    chosen = overrides.get("communication_data_type")
    if chosen is not None and reduce_dtype != "auto" and chosen != reduce_dtype:
        raise ConfigError(
            f"distributed.deepspeed.communication_data_type={chosen} contradicts "
            f"distributed.reduce_dtype={reduce_dtype}: set one of them.")
    dtype = chosen or COMMUNICATION_DTYPES[reduce_dtype]
    if vendor == "amd" and dtype != "fp32":
        raise ConfigError(
            f"gradient communication in {dtype} on AMD GPUs: bf16 gradient all-reduce under "
            "DeepSpeed has a known NaN report on ROCm (accelerate forces fp32 there too), so "
            "DeepSpeed runs reduce gradients in fp32 on AMD. Remove "
            "distributed.deepspeed.communication_data_type / distributed.reduce_dtype.")


def build_config(strategy: str, *, micro_batch_size: int, grad_accum_steps: int,
                 mixed_precision: str, max_grad_norm: float, cpu_offload: bool = False,
                 reduce_dtype: str = "auto", overrides: Mapping | None = None,
                 vendor: str = "cpu") -> dict:
    """The DeepSpeed config of a run: the stage's defaults, then `overrides`
    (`distributed.deepspeed`) merged over them key by key.

    `mixed_precision` is the plan's (bf16 | fp16 | no): DeepSpeed's 16-bit mode then keeps
    16-bit weights and gradients with fp32 master weights in the optimizer. Gradients are
    communicated in fp32 (`reduce_dtype` or the override may choose bf16, except on AMD).
    `cpu_offload` moves the optimizer state and its step to host memory. Raises ConfigError
    for entries that contradict the run (`check_overrides`) or the plan's precision.
    """
    overrides = dict(overrides or {})
    check_overrides(strategy, overrides, reduce_dtype=reduce_dtype, vendor=vendor)
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected bf16, fp16 or no")
    for mode in ("bf16", "fp16"):
        enabled = (overrides.get(mode) or {}).get("enabled")
        if enabled is not None and bool(enabled) != (mode == mixed_precision):
            raise ConfigError(
                f"distributed.deepspeed.{mode}.enabled={enabled} contradicts the kernel plan's "
                f"precision ({mixed_precision}): choose it with kernels.precision and remove "
                "the entry.")
    zero: dict[str, Any] = {"stage": STAGES[strategy], "overlap_comm": True,
                            "contiguous_gradients": True}
    if cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": vendor != "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        # DeepSpeed clips inside its step; 0 turns clipping off, as trainer.max_grad_norm=0 does.
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "communication_data_type": COMMUNICATION_DTYPES[reduce_dtype],
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        # The optimizer is the plan's torch optimizer (accelerate swaps in DeepSpeed's CPU Adam
        # when the optimizer state is offloaded).
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if mixed_precision == "bf16":
        # Skip a step whose gradients are not finite, as the loop's on_nan policy expects:
        # DeepSpeed applied such bf16 steps by default until deepspeedai/DeepSpeed#8035.
        config["bf16"]["check_grad_overflow"] = True
    return _merge(config, overrides)


class DeepSpeedZero:
    """The engine of deepspeed_zero2 / deepspeed_zero3 (interface: `finetune.distributed.engine`).

    One instance serves one run: `prepare` keeps the DeepSpeedEngine that the checkpoint
    methods use. The loop's contract maps onto DeepSpeed as follows:
      - `backward`: DeepSpeed's backward, unscaled by the accumulation steps (the loss is
        already divided by the window's token count);
      - `no_sync`: marks a micro-batch that is not the window's last (DeepSpeed's accumulation
        boundary); ZeRO 2/3 still reduce-scatter each micro-batch's gradients into partitions;
      - `clip_grad_norm`: DeepSpeed's step: the global norm, clipping to `max_norm`, the update,
        and zeroed gradients. A step whose norm is not finite is not applied (DeepSpeed skips
        it), so trainer.on_nan=skip|stop keep their meaning: the returned norm is not finite
        and the loop skips or stops with the weights unchanged. The optimizer's own `step` and
        `zero_grad` then do nothing (accelerate's DeepSpeed optimizer wrapper).
    """

    sharded = True

    def __init__(self, strategy: str, *, cpu_offload: bool = False, reduce_dtype: str = "auto",
                 overrides: Mapping | None = None, vendor: str = "cpu") -> None:
        if strategy not in STAGES:
            raise ValueError(f"not a DeepSpeed strategy: {strategy!r}")
        require_deepspeed(strategy)
        self.overrides = dict(overrides or {})
        check_overrides(strategy, self.overrides, reduce_dtype=reduce_dtype, vendor=vendor)
        self.strategy = strategy
        self.stage = STAGES[strategy]
        self.cpu_offload = cpu_offload
        self.reduce_dtype = reduce_dtype
        self.vendor = vendor
        self.config: dict | None = None
        self._engine = None

    def accelerator_kwargs(self, *, micro_batch_size: int, grad_accum_steps: int,
                           mixed_precision: str, max_grad_norm: float) -> dict:
        """What `accelerate.Accelerator(...)` needs for this strategy: the DeepSpeed plugin
        with the run's config. `cpu=False` is part of it: accelerate applies DeepSpeed only
        when not told to run on the CPU, and on a CPU-only machine DeepSpeed's CPU accelerator
        then trains with the collective backend of the process group (gloo)."""
        from accelerate.utils import DeepSpeedPlugin

        if "LOCAL_RANK" not in os.environ:
            # accelerate starts DeepSpeed's process group only in a launched process.
            raise ConfigError(
                f"distributed={self.strategy} runs in processes that a launcher started, also "
                "with one process: use finetune run ... --nproc N (torchrun), or another "
                "launcher that sets RANK, LOCAL_RANK and WORLD_SIZE (accelerate launch, srun).")
        offload = self.cpu_offload
        if offload and self.vendor == "cpu":
            logger.info("distributed.cpu_offload: nothing to offload on a CPU-only machine; "
                        "the optimizer state stays where it is")
            offload = False
        self.config = build_config(
            self.strategy, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
            mixed_precision=mixed_precision, max_grad_norm=max_grad_norm, cpu_offload=offload,
            reduce_dtype=self.reduce_dtype, overrides=self.overrides, vendor=self.vendor)
        logger.info("DeepSpeed ZeRO-%d config: %s", self.stage, json.dumps(self.config))
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=copy.deepcopy(self.config)),
                "gradient_accumulation_steps": grad_accum_steps, "cpu": False}

    def prepare(self, accelerator, model: torch.nn.Module,
                make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]):
        """Wrap `model` in a DeepSpeedEngine (ZeRO-3 partitions its parameters) with the
        optimizer `make_optimizer` builds over the trainable weights; returns (engine,
        optimizer wrapper)."""
        from accelerate.utils import DistributedType

        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise RuntimeError("the Accelerator was built without this engine's "
                               "accelerator_kwargs(): it does not run DeepSpeed")
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        engine, optimizer = accelerator.prepare(model, optimizer)
        engine.set_gradient_accumulation_boundary(True)
        self._engine = engine
        logger.info("DeepSpeed ZeRO-%d over %d processes%s", self.stage,
                    accelerator.num_processes,
                    "; optimizer state offloaded to CPU" if self.config and
                    self.config["zero_optimization"].get("offload_optimizer") else "")
        return engine, optimizer

    def backward(self, accelerator, model, loss: torch.Tensor) -> None:
        """One micro-batch's backward (its gradients accumulate until the window's step)."""
        model.backward(loss, scale_wrt_gas=False)

    def no_sync(self, accelerator, model) -> Callable[[], object]:
        """A context factory for the micro-batches before a window's last one."""
        return lambda: _before_boundary(model)

    def clip_grad_norm(self, accelerator, params: list[torch.nn.Parameter],
                       max_norm: float) -> float:
        """DeepSpeed's step (see the class docstring): returns the global gradient norm before
        clipping; not finite when the step was skipped."""
        engine = self._require_engine()
        if engine.gradient_clipping() != max_norm:
            raise ValueError(f"max_norm={max_norm} differs from the DeepSpeed config's "
                             f"gradient_clipping={engine.gradient_clipping()}")
        engine.step()
        norm = engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    # ------------------------------------------------------------ checkpoints

    def save_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict, dict]:
        """No whole tensors for rank 0 (empty trainable and optimizer state) and an empty
        shards dict: the state stays in DeepSpeed's partitions until `save_shards` writes it."""
        return {}, {}, {}

    def save_shards(self, shards: dict, directory: Path) -> None:
        """Every rank: write this rank's partition into `directory/deepspeed` (DeepSpeed's
        checkpoint format; frozen weights are left out, they reload from the model)."""
        engine = self._require_engine()
        target = Path(directory) / DEEPSPEED_DIR
        engine.save_checkpoint(str(target), tag=TAG, save_latest=False,
                               exclude_frozen_parameters=True)
        if engine.global_rank == 0:
            layout = {"world_size": engine.world_size, "stage": self.stage,
                      "trainable": _trainable_shapes(engine.module)}
            (target / LAYOUT).write_text(json.dumps(layout, indent=1), encoding="utf-8")

    def load_state(self, model: torch.nn.Module, optimizer, checkpoint: Path,
                   trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Every rank: load a DeepSpeed checkpoint written by a run with the same number of
        processes and the same trainable weights; CheckpointError otherwise."""
        engine = self._require_engine()
        source = Path(checkpoint) / DEEPSPEED_DIR
        if not source.is_dir():
            raise CheckpointError(
                f"checkpoint {checkpoint} was written under another strategy (no {DEEPSPEED_DIR}/ "
                "folder): a DeepSpeed run resumes only from DeepSpeed checkpoints. Resume with "
                "the strategy that wrote it (distributed=...), or start a new output_dir.")
        layout = json.loads((source / LAYOUT).read_text(encoding="utf-8"))
        if layout["world_size"] != engine.world_size:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written by {layout['world_size']} processes and "
                f"this run has {engine.world_size}: DeepSpeed's optimizer partitions load only "
                f"on as many processes. Resume with --nproc {layout['world_size']}, or start a "
                "new output_dir.")
        _check_trainable(layout["trainable"], _trainable_shapes(engine.module), checkpoint)
        try:
            path, _ = engine.load_checkpoint(str(source), tag=TAG, load_module_strict=False,
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        except Exception as exc:  # DeepSpeed raises assorted errors for unreadable files
            raise CheckpointError(f"checkpoint {checkpoint}: DeepSpeed could not read it "
                                  f"({type(exc).__name__}: {str(exc)[:300]}). Resume from an "
                                  "earlier checkpoint.") from None
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint}: DeepSpeed found no state in "
                                  f"{source}. Resume from an earlier checkpoint.")

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every rank: the trainable weights as whole fp32 tensors (DeepSpeed's master
        weights, gathered from the partitions), on rank 0; an empty dict elsewhere."""
        from deepspeed.utils import safe_get_full_fp32_param

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        weights = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param)  # collective under ZeRO-3
            if rank == 0:
                weights[name] = full.detach().cpu()
        return weights

    def _require_engine(self):
        if self._engine is None:
            raise RuntimeError("DeepSpeedZero.prepare() has not run")
        return self._engine


@contextlib.contextmanager
def _before_boundary(engine) -> Iterator[None]:
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def _trainable_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Trainable weights by name with their whole shape (ZeRO-3 keeps it in `ds_shape`)."""
    return {name: list(getattr(param, "ds_shape", param.shape))
            for name, param in model.named_parameters() if param.requires_grad}


def _check_trainable(saved: dict[str, list[int]], own: dict[str, list[int]],
                     checkpoint: Path) -> None:
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shape = sorted(n for n in own if n in saved and list(saved[n]) != own[n])
    if missing or extra or shape:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {extra[:3]}" if extra else f"shape differs for {shape[:3]}")
        raise CheckpointError(
            f"checkpoint {checkpoint} was saved from another model or adapter shape ({detail}). "
            "Resume with the same model and peft settings, or start a new output_dir.")
