"""Checkpoint layout, save, load, discovery and retention.

A checkpoint is `OUTPUT_DIR/checkpoints/step_NNNNNNN/`. It is built in a temporary sibling
directory, every file is fsync'd, the manifest (sha256 of every file) is written last, and only
then is the directory renamed into place. A checkpoint without a valid manifest is never used.
Nothing is unpickled on load: tensors come from safetensors, optimizer/scheduler state from
`torch.load(weights_only=True)`, everything else from JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune.checkpoint.files import (
    MANIFEST,
    publish_directory,
    share_as_umask_allows,
    verify_manifest,
    write_json,
    write_manifest,
)
from finetune.errors import CheckpointError, DiskFullError

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
STATE = "trainer_state.json"
# A sharded run's weights and optimizer state: one torch.distributed.checkpoint folder.
SHARDED = "sharded"
# A DeepSpeed run's: whole fp32 tensors (safetensors) and JSON, written by
# finetune.distributed.deepspeed.
DEEPSPEED = "deepspeed"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tmp_dir_for(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f".tmp-{step_dir_name(step)}"


# ---------------------------------------------------------------- RNG


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: tensors (torch, CUDA/HIP) and JSON (python, numpy)."""
    tensors = {"torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss),
                       float(np_gauss)]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.random.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    py_version, py_state, py_gauss = plain["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def write_rank_rng(directory: Path, rank: int,
                   rng: tuple[dict[str, torch.Tensor], dict] | None = None) -> None:
    """Write `rng` (default: this process's RNG states now) as rank `rank`'s files."""
    tensors, plain = rng if rng is not None else capture_rng()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(directory / f"rng_rank{rank}.safetensors"))
    write_json(directory / f"rng_rank{rank}.json", plain)


def read_rank_rng(directory: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict] | None:
    tensor_file = directory / f"rng_rank{rank}.safetensors"
    if not tensor_file.is_file():
        return None
    plain = json.loads((directory / f"rng_rank{rank}.json").read_text(encoding="utf-8"))
    return load_file(str(tensor_file)), plain


# ---------------------------------------------------------------- save


@dataclass
class TrainerState:
    """What a checkpoint holds of a run: the Trainer hands it over (`state_dict`) and takes it
    back (`load_state_dict`).

    `progress` is JSON (step, tokens, data position, world size, ...). `rng` maps a rank to its
    RNG states: on save, this process's rank only (each rank writes its own); on load, every
    rank the checkpoint has. A sharded run (fsdp2) saves `shards` instead of `trainable` and
    `optimizer` (which stay empty): this rank's part of the weights and optimizer state, which
    every rank writes into the checkpoint's `sharded/` folder (finetune.distributed.engine); on
    load they are read from that folder by the engine.
    """

    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    progress: dict
    rng: dict[int, tuple[dict[str, torch.Tensor], dict]] = field(default_factory=dict)
    shards: dict | None = None


def prepare_tmp(output_dir: Path, step: int) -> Path:
    """Rank 0: a clean temporary directory for this step (a leftover from a crash is removed)."""
    tmp = tmp_dir_for(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_state(tmp: Path, state: TrainerState, *, config_yaml: str, kernel_plan: dict) -> None:
    """Rank 0: write weights, optimizer (unless sharded), scheduler, progress, config and plan
    into `tmp`."""
    if state.shards is None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.trainable.items()},
                  str(tmp / TRAINABLE))
        torch.save(state.optimizer, tmp / OPTIMIZER)
    torch.save(state.scheduler, tmp / SCHEDULER)
    if state.scaler is not None:
        torch.save(state.scaler, tmp / SCALER)
    write_json(tmp / STATE, state.progress)
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    write_json(tmp / "kernel_plan.json", kernel_plan)


def finish_checkpoint(output_dir: Path, step: int) -> Path:
    """Rank 0, after every rank wrote into the tmp dir: manifest, then the atomic rename.

    A folder already holding this step belongs to another trajectory (a save always writes its
    step): it is moved aside into `checkpoints/abandoned-<time>/`, never deleted or reused.
    """
    tmp = tmp_dir_for(output_dir, step)
    final = checkpoints_root(output_dir) / step_dir_name(step)
    share_as_umask_allows(tmp)  # safetensors writes its files 0600
    write_manifest(tmp, {"step": step})
    if final.exists():
        set_aside(output_dir, [final])
    publish_directory(tmp, final)
    return final


# What a checkpoint writes beyond the tensors' own bytes, measured on the tiny model's
# sharded and replicated saves and rounded up: per tensor, its record in a shard file (torch.save
# adds about 1.7 KB) and its entry in DCP's metadata (about 0.4 KB); per rank, its RNG files (the
# Python state as JSON is about 22 KB); once, the progress JSON, config.yaml, kernel_plan.json
# and the manifest.
TENSOR_OVERHEAD = 3 * 1024
RANK_OVERHEAD = 64 * 1024
FIXED_OVERHEAD = 2**20


def state_bytes(state: TrainerState, *, main: bool = True) -> int:
    """About how many bytes this rank writes into a checkpoint of `state`; summed over the
    ranks, the checkpoint's size (a little above it, never below).

    Every rank writes its part of a sharded state (`shards`: the weights and optimizer state
    of its shards, counted locally) and its RNG files; the main rank also writes the whole
    tensors of a replicated run (`trainable`, `optimizer`), the scheduler, the scaler and the
    small files.
    """
    def tensors(node: object) -> tuple[int, int]:  # (bytes, count)
        if isinstance(node, torch.Tensor):
            local = node.to_local() if hasattr(node, "to_local") else node
            return local.numel() * local.element_size(), 1
        children = (node.values() if isinstance(node, dict)
                    else node if isinstance(node, list | tuple) else ())
        sizes = [tensors(child) for child in children]
        return sum(b for b, _ in sizes), sum(n for _, n in sizes)

    parts: list[object] = [state.shards, list(state.rng.values())]
    if main:
        parts += [state.trainable, state.optimizer, state.scheduler, state.scaler]
    size, count = tensors(parts)
    return (size + count * TENSOR_OVERHEAD + RANK_OVERHEAD
            + (FIXED_OVERHEAD if main else 0))


def check_free_space(directory: Path, needed: int, what: str, free: int | None = None) -> None:
    """DiskFullError before writing `needed` bytes under `directory` when they cannot fit.
    `free`: the free bytes already measured (by one rank, for all of them)."""
    free = shutil.disk_usage(directory).free if free is None else free
    if free < needed:
        raise disk_full(directory, needed, what, free=free)


def disk_full(directory: Path, needed: int | None, what: str, *, free: int | None = None,
              keeps: str = "Earlier checkpoints are intact.",
              fix: str = "Free some space (or lower trainer.keep_last_n), then continue with "
                         "resume=auto.") -> DiskFullError:
    """The error for a write of `what` under `directory` that does not fit: the MB needed and
    free, what is still intact (`keeps`) and what to do (`fix`)."""
    if free is None:  # measured where the folder is, or would be (it may have been removed)
        existing = next(p for p in [Path(directory), *Path(directory).parents] if p.exists())
        free = shutil.disk_usage(existing).free
    size = f"about {needed / 1e6:.1f} MB" if needed else "more space"
    return DiskFullError(
        f"not enough disk space to write {what} in {directory}: it needs {size} and "
        f"{free / 1e6:.1f} MB are free. {keeps} {fix}")


def is_disk_full(exc: BaseException) -> bool:
    """True for an error raised because a write ran out of space (ENOSPC/EDQUOT, also from
    safetensors' writer), also when torch.distributed.checkpoint reports it as one
    rank's failure among its CheckpointException's `failures`."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors' Rust writer raises SafetensorError with the OS error only in its text.
    if any(f"os error {code})" in str(exc) for code in (errno.ENOSPC, errno.EDQUOT)):
        return True
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):  # rank -> (exception, traceback summary)
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException) and is_disk_full(inner):
                return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and is_disk_full(cause)


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------- discovery and load


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All step directories (complete or not), oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; broken ones are skipped with a warning."""
    for _step, path in reversed(list_checkpoints(output_dir)):
        problem = verify_manifest(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainerState
    config_yaml: str


def _read_all_rng(path: Path) -> dict[int, tuple[dict[str, torch.Tensor], dict]]:
    ranks = sorted(int(p.name[len("rng_rank"):-len(".safetensors")])
                   for p in path.glob("rng_rank*.safetensors"))
    return {rank: read_rank_rng(path, rank) for rank in ranks}


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify and load a checkpoint directory (CheckpointError when it is not usable)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"resume={path}: no such checkpoint directory. Use resume=auto to "
                              "pick the newest complete checkpoint of output_dir.")
    problem = verify_manifest(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}. Resume from an "
                              "earlier one (resume=PATH) or use resume=auto.")
    try:
        scaler = (torch.load(path / SCALER, weights_only=True, map_location="cpu")
                  if (path / SCALER).is_file() else None)
        # Read by the engine, on every rank.
        sharded = (path / SHARDED).is_dir() or (path / DEEPSPEED).is_dir()
        state = TrainerState(
            trainable={} if sharded else load_file(str(path / TRAINABLE)),
            optimizer={} if sharded else torch.load(path / OPTIMIZER, weights_only=True,
                                                    map_location="cpu"),
            scheduler=torch.load(path / SCHEDULER, weights_only=True, map_location="cpu"),
            scaler=scaler,
            progress=json.loads((path / STATE).read_text(encoding="utf-8")),
            rng=_read_all_rng(path),
        )
        return LoadedCheckpoint(path=path, state=state,
                                config_yaml=(path / "config.yaml").read_text(encoding="utf-8"))
    except Exception as exc:  # a verified file that still fails to parse is a broken checkpoint
        raise CheckpointError(f"checkpoint {path} could not be read ({type(exc).__name__}: "
                              f"{exc}). Resume from an earlier checkpoint.") from None


# ---------------------------------------------------------------- retention


def apply_retention(output_dir: Path, keep_last_n: int, best_step: int | None = None) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last_n` (0 keeps all).

    The newest complete checkpoint and the best one (`best_step`) are never deleted, nor is a
    directory without a manifest (it may be someone's only copy to inspect). Checksums are
    verified on resume, not here, so retention stays cheap for multi-GB checkpoints.
    """
    if keep_last_n <= 0:
        return []
    complete = [(s, p) for s, p in list_checkpoints(output_dir) if (p / MANIFEST).is_file()]
    keep = {p for _s, p in complete[-keep_last_n:]}
    removed = []
    for step, path in complete:
        if path in keep or step == best_step:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def set_aside(output_dir: Path, paths: list[Path]) -> Path | None:
    """Move checkpoint folders into a new `checkpoints/abandoned-<time>/` (never deleted: they
    may be someone's only copy of another trajectory). Returns that folder, or None."""
    if not paths:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = checkpoints_root(output_dir) / f"abandoned-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"abandoned-{stamp}-{n}")
    target.mkdir(parents=True)
    for path in paths:
        path.rename(target / path.name)
    logger.warning("moved %d checkpoint folder(s) of an abandoned trajectory to %s: %s",
                   len(paths), target, ", ".join(p.name for p in paths))
    return target


def abandon_after(output_dir: Path, step: int) -> Path | None:
    """Resuming from `step` abandons every later checkpoint folder (complete or not): move them
    aside so that no later resume continues from another trajectory's weights."""
    later = [path for s, path in list_checkpoints(output_dir) if s > step]
    return set_aside(output_dir, later)


def remove_stale_tmp(output_dir: Path) -> None:
    """Remove temporary directories left by a save that was killed (never complete ones)."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)
