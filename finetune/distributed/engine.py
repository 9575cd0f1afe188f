"""Engines: how a strategy wraps the model and optimizer, synchronises gradients and
checkpoints the weights that train.

`Replicated` (single, ddp) prepares model and optimizer with accelerate, which wraps the model in
DistributedDataParallel under several processes. `FullyShard` (fsdp2) shards every decoder
layer, the embeddings, [norm, head] and then the whole model with
`torch.distributed.fsdp.fully_shard` (FSDP2). Accelerate does not apply FSDP to CPU processes
(its FSDP path is for accelerator devices), so the engine calls torch directly, the same way on
every vendor, with FSDP2's mixed-precision policy for the plan's mixed precision.

Checkpoints: a replicated run writes the trainable weights and the optimizer state from rank 0
(`trainable.safetensors`, `optimizer.pt`); a sharded run writes one shard per rank with
`torch.distributed.checkpoint` (DCP) into the checkpoint's `sharded/` folder, which loads on
any number of processes. Either engine loads either kind, so a run may resume under another
strategy or world size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from finetune.checkpoint.store import SHARDED as SHARDED_DIR
from finetune.checkpoint.trainable import load_trainable, trainable_state
from finetune.distributed.requirements import check_model_for_sharding
from finetune.errors import CheckpointError

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def _optimizer_by_name(optimizer_state: dict, names: list[str]) -> dict:
    """A torch optimizer state_dict (parameters numbered in param-group order) keyed by
    parameter name instead, the form `torch.distributed.checkpoint.state_dict` reads."""
    state = {names[i]: value for i, value in optimizer_state["state"].items()}
    groups = [{**group, "params": [names[i] for i in group["params"]]}
              for group in optimizer_state["param_groups"]]
    return {"state": state, "param_groups": groups}


class Replicated:
    """single and ddp: every process holds the whole model (accelerate's prepare)."""

    sharded = False

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy

    def accelerator_kwargs(self, *, micro_batch_size: int, grad_accum_steps: int,
                           mixed_precision: str, max_grad_norm: float) -> dict:
        """What this strategy adds to `accelerate.Accelerator(...)` (nothing here)."""
        return {}

    def prepare(self, accelerator, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        """Wrap `model` for this strategy and build its optimizer over the trainable weights."""
        optimizer = make_optimizer(list(trainable_state(model).values()))
        return accelerator.prepare(model, optimizer)

    def backward(self, accelerator, model: torch.nn.Module, loss: torch.Tensor) -> None:
        accelerator.backward(loss)

    def no_sync(self, accelerator, model: torch.nn.Module) -> Callable[[], object] | None:
        """A context factory that skips gradient communication (accumulation micro-steps)."""
        if accelerator.num_processes == 1:
            return None
        return lambda: accelerator.no_sync(model)

    def clip_grad_norm(self, accelerator, params: list[torch.nn.Parameter],
                       max_norm: float) -> float:
        """Clip to `max_norm` (0: do not clip) and return the total gradient norm."""
        if max_norm > 0:
            return float(accelerator.clip_grad_norm_(params, max_norm))
        norms = [p.grad.detach().norm(2) for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    # ------------------------------------------------------------ checkpoints

    def save_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict, dict | None]:
        """(trainable weights, optimizer state, shards): what a checkpoint of this step holds.
        Replicated runs give the first two (written by rank 0) and no shards."""
        return trainable_state(model), optimizer.state_dict(), None

    def save_shards(self, shards: dict, directory: Path) -> None:
        """Every rank: write this rank's part of `shards` into the checkpoint `directory`."""
        save_shards(shards, directory)

    def load_state(self, model: torch.nn.Module, optimizer, checkpoint: Path,
                   trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Load a checkpoint's weights and optimizer state (either kind) into this run."""
        _refuse_deepspeed_checkpoint(checkpoint, self.strategy)
        if (checkpoint / SHARDED_DIR).is_dir():
            load_shards(model, optimizer, checkpoint)
            return
        load_trainable(model, trainable, checkpoint)
        optimizer.load_state_dict(optimizer_state)

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The weights `final/` is written from; None: the model's own state_dict."""
        return None


class FullyShard(Replicated):
    """fsdp2: decoder layers, then the whole model, sharded with `fully_shard`.

    Frozen base weights are sharded like trainable ones, so a LoRA run holds 1/world of the
    base per process. Under several processes only rank 0 reads the weights; the others build
    on the meta device and receive their shards (`send_weights_from_rank0`). Mixed precision:
    the policy gathers the weights in the plan's compute dtype, and the forward runs them with
    no autocast on top (outputs in fp32, as for a replicated model); gradients are reduced in
    `reduce_dtype` (fp32 by default).
    """

    sharded = True

    def __init__(self, *, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 reduce_dtype: torch.dtype = torch.float32,
                 param_dtype: torch.dtype | None = None) -> None:
        super().__init__("fsdp2")
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.reduce_dtype = reduce_dtype
        self.param_dtype = param_dtype

    def prepare(self, accelerator, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        check_model_for_sharding("fsdp2", model)  # before any collective: a refusal exits 2
        _ensure_process_group(accelerator)
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        # Gathered weights in the compute dtype: autocast would otherwise keep a second,
        # low-precision copy of every fp32 weight it casts.
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward,
                   "mp_policy": policy,
                   "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()}
        from_rank0 = self.weights_from_rank0(accelerator)
        # Rank 0's whole weights, kept on the host while they are sent (the tensors its
        # parameters held before sharding replaced them).
        full = _whole_state(model) if from_rank0 and accelerator.process_index == 0 else None
        if not self.cpu_offload and not from_rank0:
            model.to(accelerator.device)
        layers = shard_units(model, functools.partial(fully_shard, **options),
                             reshard_after_forward=self.reshard_after_forward)
        if from_rank0:
            send_weights_from_rank0(model, full, accelerator.device, cpu_offload=self.cpu_offload)
            del full
        logger.info("fsdp2: %d decoder layers, the embeddings, the head and the model sharded "
                    "over %d processes%s", len(layers), accelerator.num_processes,
                    "; parameters, gradients and optimizer state offloaded to CPU"
                    if self.cpu_offload else "")
        if accelerator.native_amp:
            # The policy already runs the gathered weights in the compute dtype: no autocast on
            # top of it (torchtitan's practice), only fp32 outputs, as for a replicated model.
            _autocast_forward(None if self.param_dtype is not None else accelerator, model)
        optimizer = make_optimizer(list(trainable_state(model).values()))
        return model, accelerator.prepare_optimizer(optimizer, device_placement=False)

    def weights_from_rank0(self, accelerator) -> bool:
        """Whether only rank 0 reads the weights: under several processes the others build
        their model on the meta device, and `prepare` sends every rank its shards from rank 0's
        host copy once the model is sharded, so no rank but 0 ever holds the whole model."""
        return accelerator.num_processes > 1

    def no_sync(self, accelerator, model: torch.nn.Module) -> Callable[[], object] | None:
        if accelerator.num_processes == 1:
            return None
        return functools.partial(_without_gradient_sync, model)

    def clip_grad_norm(self, accelerator, params: list[torch.nn.Parameter],
                       max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        accelerator.unscale_gradients()
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm > 0:
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            total = total_norm(params, grads) if grads else torch.tensor(0.0)
        if isinstance(total, DTensor):  # the norm of the shards, summed over the ranks
            total = total.full_tensor()
        return float(total)

    def save_state(self, model: torch.nn.Module, optimizer) -> tuple[dict, dict, dict | None]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer,
                                                  options=_state_dict_options())
        return {}, {}, {"model": model_state, "optim": optim_state}

    def load_state(self, model: torch.nn.Module, optimizer, checkpoint: Path,
                   trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        _refuse_deepspeed_checkpoint(checkpoint, self.strategy)
        if (checkpoint / SHARDED_DIR).is_dir():
            load_shards(model, optimizer, checkpoint)
            return
        # A replicated run's checkpoint: whole tensors on every rank, sharded as they load.
        names = list(trainable_state(model))
        _check_names(names, trainable, checkpoint)
        set_state_dict(model, optimizer, model_state_dict=trainable,
                       optim_state_dict=_optimizer_by_name(optimizer_state, names),
                       options=_state_dict_options(full_state_dict=True, strict=False))

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The trainable weights gathered from every shard (every rank must call this); whole
        tensors on rank 0, an empty dict elsewhere. A LoRA run's final/ needs only these; a
        full fine-tune's trainable weights are all of them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(
            model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))


def total_norm(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of `grads` (DTensor shards included), without clipping them.
    `torch.nn.utils.get_total_norm` came with torch 2.6; before it, clip_grad_norm_ with an
    infinite max_norm returns the same norm and scales the gradients by 1 (a non-finite norm
    then makes them non-finite too, and the step is skipped either way)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def _whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0: every parameter and persistent buffer of the unsharded model, by the names
    `set_model_state_dict` uses (references, not copies)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def send_weights_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor] | None,
                            device: torch.device, *, cpu_offload: bool = False) -> None:
    """Every rank (collective), after `fully_shard`: give each rank its shards of rank 0's
    weights. `full`: rank 0's whole state (None elsewhere). Ranks other than 0 built their
    model on the meta device; their shards are allocated here and filled one tensor at a time
    (`set_model_state_dict` with `broadcast_from_rank0`), so they hold one whole tensor at
    most. Buffers (rotary frequencies, which no checkpoint holds) are broadcast whole, and so
    is rank 0's random-number state: the others did not draw the adapter's random init, and
    every rank draws from there on as it did when each built its own copy."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if rank != 0:
        model.to_empty(device="cpu" if cpu_offload else device)
    set_model_state_dict(model, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                buffer = buffer.to(device)
                setattr(module, name, buffer)
            dist.broadcast(buffer, src=0)
    state = [torch.get_rng_state() if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])


def _refuse_deepspeed_checkpoint(checkpoint: Path, strategy: str) -> None:
    from finetune.checkpoint.store import DEEPSPEED

    if (checkpoint / DEEPSPEED).is_dir():
        raise CheckpointError(
            f"checkpoint {checkpoint} was written by a DeepSpeed run (whole tensors in "
            f"deepspeed/master.safetensors); distributed={strategy} does not read that folder. "
            "Resume with distributed=deepspeed_zero2 or deepspeed_zero3, or start a new "
            "output_dir.")


def _ensure_process_group(accelerator) -> None:
    """fsdp2 on one process (for its CPU offload) still needs a process group: a one-rank
    group on an in-memory store."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "gloo" if accelerator.device.type == "cpu" else None
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def _check_names(names: list[str], tensors: dict, checkpoint: Path) -> None:
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(
            f"checkpoint {checkpoint} was saved from another model or adapter shape ({detail}). "
            "Resume with the same model and peft settings, or start a new output_dir.")


def load_shards(model: torch.nn.Module, optimizer, checkpoint: Path) -> None:
    """Load a sharded checkpoint into `model` and `optimizer`, resharding to this run's
    processes (DCP reads each rank's part of every tensor, whatever the saving world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options())
    _check_names(list(model_state), _saved_tensor_names(checkpoint), checkpoint)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _one_process_without_a_group() as alone:
            dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=alone)
    except Exception as exc:  # DCP raises its own CheckpointException with every rank's error
        raise CheckpointError(f"checkpoint {checkpoint}: its shards could not be read "
                              f"({type(exc).__name__}: {str(exc)[:300]}). Resume from an earlier "
                              "checkpoint.") from None
    # Not strict: the frozen weights are the model's own (checked above: no trainable one is
    # missing).
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_state_dict_options(strict=False))


@contextlib.contextmanager
def _one_process_without_a_group() -> Iterator[bool]:
    """True when this process loads alone, without a process group (a sharded checkpoint
    resumed on one process). DCP then warns that it is 'assuming the intent is to load in a
    single process', even when told so (no_dist=True): that is the intent, and the warning is
    silenced here."""
    import torch.distributed as dist

    alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                    category=UserWarning)
        yield alone


def _saved_tensor_names(checkpoint: Path) -> dict[str, None]:
    """The model weights a sharded checkpoint holds, by name (from DCP's metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / SHARDED_DIR)).read_metadata()
    return {key[len("model."):]: None for key in metadata.state_dict_metadata
            if key.startswith("model.")}


def save_shards(shards: dict, directory: Path) -> None:
    """Every rank: write this rank's part of `shards` into `directory/sharded` (collective).
    A failure on any rank raises DCP's CheckpointException on every rank; DCP's own log record
    of it (every rank's traceback) is kept out of the rank logs, where the run's one-paragraph
    error says what happened."""
    import torch.distributed.checkpoint as dcp

    dcp_loggers = [log for name, log in logging.Logger.manager.loggerDict.items()
                   if name.endswith("dcp_logger") and isinstance(log, logging.Logger)]
    for dcp_logger in dcp_loggers:
        dcp_logger.disabled = True
    try:
        dcp.save(shards, checkpoint_id=str(directory / SHARDED_DIR))
    finally:
        for dcp_logger in dcp_loggers:
            dcp_logger.disabled = False


def shard_units(model: torch.nn.Module, shard: Callable[..., object], *,
                reshard_after_forward: bool) -> list[torch.nn.Module]:
    """Shard `model` unit by unit with `shard` (fully_shard with the run's options) and return
    its decoder layers. The units, as torchtitan makes them: each decoder layer, the input
    embeddings, [final norm, LM head] (the last two together, torch >= 2.6; the head alone
    before), then the rest with the model. The embeddings and the head stay in the model's
    unit when they share their weight. The last decoder layer and the head are not resharded
    after the forward: the backward starts with them, and would gather them again at once."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    embeddings, head = _edge_units(model)
    if embeddings is not None:
        shard(embeddings, reshard_after_forward=reshard_after_forward)
    if head:
        shard(head if len(head) > 1 else head[0], reshard_after_forward=False)
    shard(model, reshard_after_forward=reshard_after_forward)
    return layers


def _edge_units(model: torch.nn.Module
                ) -> tuple[torch.nn.Module | None, list[torch.nn.Module]]:
    """(input embeddings, [final norm, LM head]) of a transformers model, to shard as their own
    units; (None, []) when they share a weight or the model does not name them."""
    from finetune.distributed.requirements import torch_version
    from finetune.kernels.registry import version_at_least

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, []
    if not isinstance(embeddings, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None, []
    if any(p is q for p in embeddings.parameters() for q in head.parameters()):
        return None, []
    inner = getattr(base, getattr(base, "base_model_prefix", ""), None)
    norm = getattr(inner, "norm", None)
    if isinstance(norm, torch.nn.Module) and version_at_least(torch_version(), "2.6"):
        return embeddings, [norm, head]
    return embeddings, [head]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the modules transformers names in the model's
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def _without_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _autocast_forward(accelerator, model: torch.nn.Module) -> None:
    """Make the forward return fp32 outputs, as accelerate's prepare does for a replicated
    model; with an `accelerator`, run it under the plan's autocast as well (None: no
    autocast)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return forward(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(autocast_forward)


REDUCE_DTYPES = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}


def build_engine(strategy: str, *, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 reduce_dtype: str = "auto", vendor: str = "cpu",
                 compute_dtype: torch.dtype | None = None, deepspeed: dict | None = None):
    """The engine for a concrete strategy (never `auto`: `finetune.distributed.choose`
    resolves that first). `compute_dtype`: the plan's autocast dtype (None: no autocast)."""
    from finetune.errors import ConfigError

    if reduce_dtype not in REDUCE_DTYPES:
        raise ConfigError(f"distributed.reduce_dtype={reduce_dtype!r}: use auto, fp32 or bf16.")
    if reduce_dtype == "bf16" and vendor == "amd":
        raise ConfigError(
            "distributed.reduce_dtype=bf16 on AMD GPUs: bf16 gradient reduction has a known NaN "
            "report on ROCm, so gradients are reduced in fp32 there. Remove the override "
            "(or set distributed.reduce_dtype=fp32).")
    if cpu_offload and vendor == "cpu":
        raise ConfigError("distributed.cpu_offload=on: this run is on the CPU, whose memory "
                          "already holds everything; remove the override (offload moves "
                          "weights and optimizer state from a GPU to host memory).")
    if strategy in ("single", "ddp"):
        return Replicated(strategy)
    if strategy == "fsdp2":
        return FullyShard(reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload,
                          reduce_dtype=REDUCE_DTYPES[reduce_dtype], param_dtype=compute_dtype)
    if strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        from finetune.distributed.deepspeed import DeepSpeedZero

        return DeepSpeedZero(strategy, cpu_offload=cpu_offload, reduce_dtype=reduce_dtype,
                             overrides=deepspeed, vendor=vendor)
    raise ValueError(f"no engine for strategy {strategy!r}")
