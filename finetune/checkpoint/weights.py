"""The trained weights a checkpoint holds, as whole tensors on the CPU, whichever strategy
wrote it: `trainable.safetensors` (single, ddp), `sharded/` (fsdp2: torch.distributed.checkpoint
shards, gathered here in one process without a process group) or `deepspeed/master.safetensors`
(DeepSpeed's fp32 master weights). What `finetune eval`, `generate` and `merge` load from a
checkpoint, as `final/` is written from a finished run."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from finetune.checkpoint.store import DEEPSPEED, SHARDED, TRAINABLE
from finetune.errors import CheckpointError

# The prefix of the model's entries in a sharded checkpoint (the optimizer's are "optim.").
MODEL_PREFIX = "model."


def holds_weights(path: Path) -> bool:
    """True when `path` is a checkpoint folder of any strategy (it may still be incomplete)."""
    return ((path / TRAINABLE).is_file() or (path / SHARDED).is_dir()
            or (path / DEEPSPEED).is_dir())


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of the checkpoint `path`, by parameter name, whole, on the CPU.
    CheckpointError (exit code 2) when its files cannot be read."""
    from safetensors.torch import load_file

    try:
        if (path / SHARDED).is_dir():
            return _gather_shards(path / SHARDED)
        if (path / DEEPSPEED).is_dir():  # a weight is "fp32/<name>", its moments "<key>/<name>"
            from finetune.distributed.deepspeed import FP32, MASTER

            master = load_file(str(path / DEEPSPEED / MASTER))
            return {key[len(FP32) + 1:]: value for key, value in master.items()
                    if key.startswith(f"{FP32}/")}
        return load_file(str(path / TRAINABLE))
    except Exception as exc:  # a verified file that still fails to parse is a broken checkpoint
        raise CheckpointError(f"checkpoint {path}: its weights could not be read "
                              f"({type(exc).__name__}: {str(exc)[:300]}). Use an earlier "
                              "checkpoint, or the run's final/.") from None


def _gather_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every rank's shards of the model's weights, read into whole tensors by this process
    alone (DCP reads whatever world size wrote them); the optimizer state is not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(folder))
    entries = reader.read_metadata().state_dict_metadata
    model = {key[len(MODEL_PREFIX):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items()
             if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": yes
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
