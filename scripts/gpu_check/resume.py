"""resume: N optimizer steps straight against k steps, a checkpoint, a fresh model and optimizer
loaded from it, and the N - k steps after: the losses and the final adapters must be bitwise
equal (finetune's promise: resume is exact).

The model is the step section's with fewer layers and adapter dropout, so a resume that lost
the device's random-number state would draw other dropout masks and show it. The checkpoint is
written and read by finetune's own code: the replicated engine's state (adapters and optimizer
state), the RNG files, the manifest and its atomic rename, and `load_checkpoint`. The straight
run is repeated first: when the device itself does not repeat a run bit for bit (an attention
kernel whose backward adds in a varying order), the resumed losses are held to a tolerance
instead, and the report says so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from .context import Context, packed_candidate, use_attention
from .runner import Skip
from .step import optimizer_step, step_batches, step_model, step_optimizer

STEPS = 4
RESUME_AT = 2
DROPOUT = 0.1


def _trained(ctx: Context, attn: str, steps: list[Any]) -> tuple[Any, Any, list[float]]:
    """A fresh seeded model and optimizer, trained on `steps`: (model, optimizer, losses)."""
    model = step_model(ctx, attn, ctx.packed_plan.choice("lora"),
                       layers=ctx.sizes.small_step_layers, dropout=DROPOUT)
    optimizer = step_optimizer(ctx, model)
    return model, optimizer, [optimizer_step(model, optimizer, s)[0] for s in steps]


def _adapters(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save(ctx: Context, output_dir: Path, step: int, model: Any, optimizer: Any) -> Path:
    """Checkpoint `step` as a replicated run's Trainer does (finetune.train.trainer)."""
    from finetune.checkpoint import store
    from finetune.distributed.engine import Replicated

    trainable, optimizer_state, _ = Replicated("single").save_state(model, optimizer)
    state = store.TrainerState(trainable=trainable, optimizer=optimizer_state, scheduler={},
                               scaler=None, progress={"step": step},
                               rng={0: store.capture_rng()})
    tmp = store.prepare_tmp(output_dir, step)
    store.write_state(tmp, state, config_yaml="", kernel_plan=ctx.packed_plan.to_dict())
    store.write_rank_rng(tmp, 0, state.rng[0])
    return store.finish_checkpoint(output_dir, step)


def load(checkpoint: Path, model: Any, optimizer: Any) -> None:
    """Continue from `checkpoint` as the Trainer's resume does: weights, optimizer state, RNG."""
    from finetune.checkpoint import store
    from finetune.distributed.engine import Replicated

    loaded = store.load_checkpoint(checkpoint)
    Replicated("single").load_state(model, optimizer, checkpoint, loaded.state.trainable,
                                    loaded.state.optimizer)
    store.restore_rng(*loaded.state.rng[0])


def section_resume(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    planned = packed_candidate(ctx)
    if planned.packing_isolation is None:
        raise Skip(f"the plan's attention ({planned.name}) does not pack")
    attn = use_attention(ctx, planned)
    batches = step_batches(ctx, planned.packing_isolation, STEPS)
    out.update(attention=planned.name, lora=ctx.packed_plan.choice("lora"),
               layers=ctx.sizes.small_step_layers, lora_dropout=DROPOUT, steps=STEPS,
               resumed_at=RESUME_AT)
    model, _, straight = _trained(ctx, attn, batches)
    final = _adapters(model)
    del model
    model, _, repeat = _trained(ctx, attn, batches)
    out["straight_losses"] = straight
    out["device_repeats_bitwise"] = repeat == straight and _bitwise_equal(final, _adapters(model))
    del model
    model, optimizer, first = _trained(ctx, attn, batches[:RESUME_AT])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        checkpoint = save(ctx, Path(tmp), RESUME_AT, model, optimizer)
        out["save_s"] = round(time.perf_counter() - started, 3)
        out["checkpoint_mb"] = round(sum(p.stat().st_size for p in checkpoint.rglob("*")
                                         if p.is_file()) / 1e6, 2)
        del model, optimizer
        # A new process: the same base (seeded) with new adapters and RNG, then the checkpoint.
        model = step_model(ctx, attn, ctx.packed_plan.choice("lora"),
                           layers=ctx.sizes.small_step_layers, dropout=DROPOUT)
        optimizer = step_optimizer(ctx, model)
        torch.manual_seed(12345)
        started = time.perf_counter()
        load(checkpoint, model, optimizer)
        out["load_s"] = round(time.perf_counter() - started, 3)
    resumed = first + [optimizer_step(model, optimizer, s)[0] for s in batches[RESUME_AT:]]
    out["resumed_losses"] = resumed
    out["bitwise_equal"] = resumed == straight
    out["adapters_bitwise_equal"] = _bitwise_equal(final, _adapters(model))
    out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(resumed, straight, strict=True))
    if out["device_repeats_bitwise"]:
        if not (out["bitwise_equal"] and out["adapters_bitwise_equal"]):
            raise RuntimeError(f"resume is not exact: losses {straight} straight, {resumed} "
                               f"resumed at step {RESUME_AT} (this device repeats a run bit "
                               "for bit, so the checkpoint lost something)")
        return
    tolerance = 2e-2 if ctx.dtype != torch.float32 else 1e-4
    if out["max_abs_loss_diff"] > tolerance * max(abs(x) for x in straight):
        raise RuntimeError(f"resumed losses {resumed} differ from straight {straight} beyond "
                           f"{tolerance:g} relative (the device does not repeat a run bit for "
                           f"bit either: {repeat})")
