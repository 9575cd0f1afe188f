"""DeepSpeed ZeRO stage 2 and 3 (`distributed=deepspeed_zero2|deepspeed_zero3`) through
accelerate's DeepSpeed integration.

The DeepSpeed config comes from `finetune.distributed.deepspeed_config`. `DeepSpeedZero` is the engine (see `finetune.distributed.engine`): accelerate wraps the
model in a DeepSpeedEngine, the loop's backward goes through DeepSpeed, and DeepSpeed's step
(norm, clip, skip when the norm is not finite, update) runs where the loop clips. Checkpoints
hold whole tensors gathered with DeepSpeed's tensor API (fp32 master weights and Adam's moments,
in safetensors) and JSON for the rest, in the checkpoint's `deepspeed/` folder: nothing is
unpickled on resume, which works on any number of processes; final/ is written from the fp32
master weights.

DeepSpeed is an optional extra (`pip install 'finetune[deepspeed]'`); this module imports it
only when a DeepSpeed strategy is used.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.distributed.deepspeed_config import (
    STAGES,
    build_config,
    check_overrides,
    require_deepspeed,
)
from finetune.distributed.requirements import check_model_for_sharding
from finetune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
# A checkpoint's deepspeed/ folder: whole fp32 tensors named "<entry>/<weight name>" (entry:
# FP32 for the master weight, else an optimizer state key such as exp_avg), and JSON with the
# rest (layout, the optimizer's scalar state and parameter groups, loss scale, step counters).
MASTER = "master.safetensors"
STATE = "state.json"
FORMAT = 1
FP32 = "fp32"
# The running state of DeepSpeed's loss scaler (fp16's dynamic scale; a constant otherwise).
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
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
        """What `accelerate.Accelerator(...)` needs for this strategy, merged over its other
        arguments: the DeepSpeed plugin with the run's config (`build_config`, kept in
        `self.config`), the accumulation steps (so accelerate agrees with the config), and
        `cpu=False`: accelerate applies DeepSpeed only when not told to run on the CPU; on a
        CPU-only machine DeepSpeed's CPU accelerator then uses the process group's backend
        (gloo). ConfigError in a process no launcher started (accelerate would then run
        DeepSpeed without a process group)."""
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
        check_model_for_sharding(self.strategy, model)
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
        """Every rank (collective per trainable weight): the fp32 master weights and the
        optimizer's per-element state (Adam's moments) gathered into whole tensors, and the
        optimizer's scalar state (its step), parameter groups, loss scale and DeepSpeed's step
        counters as JSON. Returned as the shards dict, on rank 0 only (empty elsewhere): no
        whole tensors for the trainable and optimizer entries, which stay empty."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = self._require_engine()
        zero = engine.optimizer
        keys, scalars = _optimizer_entries(zero.optimizer, _flat_partitions(zero))
        main = engine.global_rank == 0
        tensors: dict[str, torch.Tensor] = {}
        for name, param in _trainable(engine.module):
            values = {FP32: safe_get_full_fp32_param(param)}  # collective under every stage
            for key in keys:
                values[key] = safe_get_full_optimizer_state(param, key)
            if main:
                tensors.update({f"{key}/{name}": value.detach().to("cpu", copy=True).contiguous()
                                for key, value in values.items()})
        if not main:
            return {}, {}, {}
        scaler = zero.loss_scaler
        state = {
            "format": FORMAT, "stage": self.stage, "world_size": engine.world_size,
            "trainable": _trainable_shapes(engine.module),
            "optimizer": {"tensor_keys": keys, "scalars": scalars,
                          "param_groups": [_group_json(g) for g in zero.optimizer.param_groups]},
            "loss_scaler": {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)},
            "engine": {k: getattr(engine, k) for k in ENGINE_COUNTERS},
        }
        return {}, {}, {"tensors": tensors, "state": state}

    def save_shards(self, shards: dict, directory: Path) -> None:
        """Rank 0 writes `directory/deepspeed/` (master.safetensors and state.json) from what
        `save_state` gathered; the other ranks hold nothing to write."""
        if not shards:
            return
        target = Path(directory) / DEEPSPEED_DIR
        target.mkdir(parents=True, exist_ok=True)
        save_file(shards["tensors"], str(target / MASTER))
        (target / STATE).write_text(json.dumps(shards["state"], indent=1), encoding="utf-8")

    def load_state(self, model: torch.nn.Module, optimizer, checkpoint: Path,
                   trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Every rank: load a DeepSpeed checkpoint, written by any number of processes, with
        the same trainable weights; CheckpointError otherwise. Nothing is unpickled: the
        tensors come from safetensors, the rest from JSON."""
        engine = self._require_engine()
        source = Path(checkpoint) / DEEPSPEED_DIR
        if not source.is_dir():
            raise CheckpointError(
                f"checkpoint {checkpoint} was written under another strategy (no {DEEPSPEED_DIR}/ "
                "folder): a DeepSpeed run resumes only from DeepSpeed checkpoints. Resume with "
                "the strategy that wrote it (distributed=...), or start a new output_dir.")
        if not (source / STATE).is_file() or not (source / MASTER).is_file():
            raise CheckpointError(
                f"checkpoint {checkpoint}: {source} has no {STATE} and {MASTER}; it was written "
                "in DeepSpeed's own format by an earlier version, which is not read because "
                "loading it would unpickle files. Resume from a newer checkpoint or start a "
                "new output_dir.")
        state = json.loads((source / STATE).read_text(encoding="utf-8"))
        _check_trainable(state["trainable"], _trainable_shapes(engine.module), checkpoint)
        zero = engine.optimizer
        saved = state["optimizer"]
        if len(saved["param_groups"]) != len(zero.optimizer.param_groups):
            raise CheckpointError(
                f"checkpoint {checkpoint} has {len(saved['param_groups'])} optimizer parameter "
                f"groups and this run's optimizer {len(zero.optimizer.param_groups)}: it was "
                "saved with other optim.* settings. Resume with the same settings, or start a "
                "new output_dir.")
        keys = saved["tensor_keys"]
        if keys:
            _create_optimizer_state(zero, self.stage, keys, saved["scalars"])
        with safe_open(str(source / MASTER), framework="pt", device="cpu") as tensors:
            for name, param in _trainable(engine.module):
                full = {key: tensors.get_tensor(f"{key}/{name}") for key in (FP32, *keys)}
                self._set_param(param, full)
        for group, values in zip(zero.optimizer.param_groups, saved["param_groups"],
                                 strict=True):
            _restore_group(group, values)
        for key, value in state["loss_scaler"].items():
            setattr(zero.loss_scaler, key, value)
        for key, value in state["engine"].items():
            setattr(engine, key, value)
        if state["world_size"] != engine.world_size:
            logger.info("resumed DeepSpeed state written by %d processes on %d",
                        state["world_size"], engine.world_size)

    def _set_param(self, param: torch.nn.Parameter, full: dict[str, torch.Tensor]) -> None:
        """Set one trainable weight's fp32 master copy, optimizer state and the 16-bit weight
        the forward uses, from whole tensors (`full`: FP32 and each optimizer key)."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        master = full[FP32]
        if self.stage == 3:
            # The local variants: the whole-tensor setters of ZeRO-3 cut the last rank's
            # slice past the end when the weight does not divide by the world size.
            local = _local_partition(param, master)
            safe_set_local_fp32_param(param, local)
            for key, value in full.items():
                if key != FP32:
                    safe_set_local_optimizer_state(param, _local_partition(param, value), key)
            param.ds_tensor.data.copy_(local.to(param.ds_tensor.dtype))
            return
        safe_set_full_fp32_param(param, master)
        for key, value in full.items():
            if key != FP32:
                safe_set_full_optimizer_state(param, value, key)
        # ZeRO 1/2 keep the whole 16-bit weight on every rank: the fp32 master, rounded.
        param.data.copy_(master.to(device=param.device, dtype=param.dtype))

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


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _flat_partitions(zero) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions: the tensors DeepSpeed's ZeRO optimizer hands the torch
    optimizer, whose state is keyed by them."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)


def _optimizer_entries(base: torch.optim.Optimizer,
                       flats: list[torch.Tensor]) -> tuple[list[str], dict[str, dict]]:
    """(keys of the per-element state, scalar state as JSON) of the torch optimizer `base`
    over DeepSpeed's flat partitions; both empty before the first step. CheckpointError for
    state of another kind (an 8-bit optimizer's quantised blocks), which has no fp32 whole
    tensor to gather."""
    keys: set[str] = set()
    scalars: dict[str, dict] = {}
    for flat in flats:
        for key, value in base.state.get(flat, {}).items():
            if torch.is_tensor(value) and value.shape == flat.shape and value.dim() == 1:
                keys.add(key)
                continue
            if torch.is_tensor(value) and value.numel() == 1:
                entry = {"tensor": value.item(), "dtype": str(value.dtype).removeprefix("torch."),
                         "on_param_device": value.device == flat.device}
            elif isinstance(value, bool | int | float):
                entry = {"value": value}
            else:
                raise CheckpointError(
                    f"optimizer state {key!r} ({type(value).__name__}) cannot be saved by a "
                    "DeepSpeed run, which saves fp32 per-element state and scalars: choose a "
                    "full-precision AdamW (kernels.optimizer=auto).")
            if scalars.setdefault(key, entry) != entry:
                raise RuntimeError(f"DeepSpeed's partitions disagree on optimizer state {key!r}: "
                                   f"{scalars[key]} and {entry}")
    return sorted(keys), scalars


def _create_optimizer_state(zero, stage: int, keys: list[str], scalars: dict[str, dict]) -> None:
    """Give the torch optimizer under DeepSpeed the state a checkpoint fills in (it creates
    its state lazily at the first step, and DeepSpeed's setters write into it): zeroed
    per-element entries and the saved scalars (the step, which Adam's bias correction reads),
    then, under ZeRO 1/2, DeepSpeed's link from each weight to its slice of that state (made
    after the first step otherwise)."""
    base = zero.optimizer
    for flat in _flat_partitions(zero):
        state = base.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        for key, entry in scalars.items():
            if "tensor" in entry:
                device = flat.device if entry["on_param_device"] else "cpu"
                state[key] = torch.tensor(entry["tensor"], dtype=getattr(torch, entry["dtype"]),
                                          device=device)
            else:
                state[key] = entry["value"]
    if stage != 3:
        zero._lazy_init_hp_params_optimizer_state()


def _local_partition(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a ZeRO-3 weight's whole tensor, zero-padded as ZeRO-3 pads the
    last partition."""
    size = param.ds_tensor.numel()
    start = torch.distributed.get_rank() * size
    part = full.flatten()[start:start + size].to(torch.float32)
    if part.numel() < size:
        part = torch.cat([part, part.new_zeros(size - part.numel())])
    return part.contiguous()


def _group_json(group: dict) -> dict:
    """A torch parameter group's settings (not its parameters) as JSON."""
    plain = {}
    for key, value in group.items():
        if key == "params":
            continue
        if torch.is_tensor(value):
            value = {"tensor": value.tolist()}
        elif isinstance(value, tuple):
            value = list(value)
        plain[key] = value
    return plain


def _restore_group(group: dict, saved: dict) -> None:
    """Set a parameter group's settings (learning rate, betas, ...) back from `_group_json`."""
    for key, value in saved.items():
        current = group.get(key)
        if isinstance(value, dict) and "tensor" in value:
            if torch.is_tensor(current):
                current.copy_(torch.tensor(value["tensor"], dtype=current.dtype))
            else:
                group[key] = torch.tensor(value["tensor"])
        elif isinstance(current, tuple):
            group[key] = tuple(value)
        else:
            group[key] = value


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
