"""The one training loop: token-normalised gradient accumulation on accelerate, evaluation,
metrics, checkpoints and preemption. The Trainer owns the loop state, the data position and the
RNG (`state_dict` / `load_state_dict`); recipes only bring their loss."""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.checkpoint import store
from finetune.config.schema import RunConfig
from finetune.errors import TrainingError
from finetune.evaluate.sampling import SampleWriter, Sampling
from finetune.kernels import KernelPlan
from finetune.metrics.monitor import RunMonitor
from finetune.train.feed import BatchFeed, pins_batches, to_device
from finetune.train.loss import (
    LossFn,
    LossOutput,
    WindowLoss,
    accumulate_gradients,
    accumulation_dtype,
    trained_tokens,
)
from finetune.train.recipe import Recipe
from finetune.train.setup import Components
from finetune.train.signals import PreemptionHandler
from finetune.train.state import LoopState

logger = logging.getLogger(__name__)

# Optimizer settings a resume takes from the run's config, not from the checkpoint's
# param_groups (optimizer.load_state_dict restores those with the moments).
CONFIGURED_HPARAMS = ("initial_lr", "weight_decay", "betas", "eps")


@dataclass
class LoopResult:
    state: LoopState
    stopped_by: str  # "max_steps" | "preempted"


def _input_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


class Trainer:
    """Runs optimizer steps until `total_steps`, a preemption signal, or a NaN stop.

    Args:
        cfg: the run's config (trainer and seed settings are read).
        parts: the components from `setup`.
        recipe: the recipe: its loss (`parts.extra_models` are bound to it as keywords) and the
            extra metrics it reports each step.
        run_dir: the run directory (metrics.jsonl, checkpoints/).
        kernel_plan: the run's plan (written into checkpoints; its peak sets MFU).
        config_yaml: the resolved config, written into checkpoints.
    """

    def __init__(self, cfg: RunConfig, parts: Components, recipe: Recipe, *, run_dir: Path,
                 kernel_plan: KernelPlan, config_yaml: str, monitor: RunMonitor) -> None:
        self.cfg = cfg
        self.parts = parts
        self.acc = parts.accelerator
        self.engine = parts.engine
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.scheduler = parts.scheduler
        self.data = parts.data
        self.loss_fn: LossFn = (functools.partial(recipe.loss, **parts.extra_models)
                                if parts.extra_models else recipe.loss)
        if cfg.trainer.activation_offload:  # refused before any work where it cannot run
            from finetune.train.activation_offload import (
                ActivationOffload,
                CudaTransfers,
                with_activation_offload,
            )

            self.loss_fn = with_activation_offload(self.loss_fn,
                                                   ActivationOffload(CudaTransfers()))
        self.recipe_metrics = recipe.metrics
        self.num_items = recipe.num_items
        self.counts_pairs = recipe.pairs  # the loss's items are pairs: logged as `pairs`
        self.run_dir = run_dir
        self.total_steps = parts.total_steps
        self.state = LoopState()
        self.kernel_plan = kernel_plan
        self.config_yaml = config_yaml
        self.monitor = monitor
        self.is_main = self.acc.is_main_process
        every = cfg.eval.generate_every_n_steps
        self.samples = SampleWriter(
            run_dir / "samples.jsonl", cfg.eval.prompts, every_n_steps=every,
            sampling=Sampling(max_new_tokens=cfg.eval.max_new_tokens),
            template=parts.data.chat_template, write=self.is_main,
            synced=parts.engine.sharded) if every else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._val_batches: list[dict] | None = None
        self._last_save_time = time.monotonic()
        self._saved_step: int | None = None
        self._data_state: dict | None = None  # data position after the last consumed batch  # the step whose checkpoint this run wrote last

    # ------------------------------------------------------------ state

    def state_dict(self) -> store.TrainerState:
        """Everything a resume needs: weights that train, optimizer, schedule, scaler, loop
        progress, the data position (batches consumed) and this rank's RNG."""
        progress = {**self.state.to_dict(), "data": self._data_position(),
                    "world_size": self.acc.num_processes, **self.monitor.state_dict()}
        scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
        trainable, optimizer, shards = self.engine.save_state(self.parts.unwrapped,
                                                              self.optimizer)
        return store.TrainerState(
            trainable=trainable, optimizer=optimizer, scheduler=self.scheduler.state_dict(),
            scaler=scaler, progress=progress, rng={self.acc.process_index: store.capture_rng()},
            shards=shards)

    def _data_position(self) -> dict:
        """The data position after the last batch the loop consumed (not the ones prefetched)."""
        return self._data_state if self._data_state is not None else self.data.train.state_dict()

    def load_state_dict(self, state: store.TrainerState, *, source: Path) -> None:
        """Continue from `state` (loaded from checkpoint `source`); CheckpointError when it
        belongs to another model or adapter shape."""
        from accelerate.utils import set_seed

        configured = [{key: group[key] for key in CONFIGURED_HPARAMS if key in group}
                      for group in self.optimizer.param_groups]
        self.engine.load_state(self.parts.unwrapped, self.optimizer, source, state.trainable,
                               state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self._use_configured_hparams(configured)
        if state.scaler is not None and self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(state.scaler)
        self.data.train.load_state_dict(state.progress["data"])
        self._data_state = None
        self.state = LoopState.from_dict(state.progress)
        self._saved_step = self.state.step
        rng = state.rng.get(self.acc.process_index)
        if rng is not None:
            store.restore_rng(*rng)
        else:
            logger.warning("checkpoint has no RNG state for rank %d (world size changed); "
                           "seeding it from seed+rank+step", self.acc.process_index)
            set_seed(self.cfg.seed + self.acc.process_index + self.state.step)

    def _use_configured_hparams(self, configured: list[dict]) -> None:
        """The loaded optimizer and schedule carry the checkpoint's settings; every step after a
        resume uses this run's: its peak rates, weight decay, betas and eps, and its schedule
        (`trainer.max_steps`, warmup, shape) evaluated at the checkpoint's position."""
        loaded = [group["lr"] for group in self.optimizer.param_groups]
        if [c["initial_lr"] for c in configured] != list(self.scheduler.base_lrs):
            logger.info("learning rate from the config, not the checkpoint: %s",
                        [c["initial_lr"] for c in configured])
        step = self.scheduler.last_epoch
        for group, settings, factor in zip(self.optimizer.param_groups, configured,
                                           self.scheduler.lr_lambdas, strict=True):
            group.update(settings)
            group["lr"] = settings["initial_lr"] * factor(step)
        self.scheduler.base_lrs = [c["initial_lr"] for c in configured]
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        now = self.scheduler._last_lr
        if now != loaded:
            logger.info("learning rate at step %d from this run's schedule: %.3g (the "
                        "checkpoint's schedule gave %.3g)", step, now[0], loaded[0])

    # ------------------------------------------------------------ helpers

    # ------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self._val_batches is None:  # already this rank's share, equal in count on all ranks
            self._val_batches = self.data.val_batches(self.cfg.trainer.eval_max_batches)
        loss_sum, tokens = 0.0, 0
        # The unwrapped model: DDP's forward broadcasts buffers, a collective that would hang
        # when ranks hold different numbers of eval batches.
        model = self.acc.unwrap_model(self.model)
        model.eval()
        for batch in self._val_batches:
            n = self.num_items(batch)
            if n == 0 and not self.engine.sharded:  # sharded: every rank joins every forward
                continue
            out = self.loss_fn(model, to_device(batch, self.acc.device),
                               torch.tensor(float(max(n, 1))))
            loss_sum += float(out.loss if isinstance(out, LossOutput) else out) * n
            tokens += n
        model.train()
        loss_sum, total_tokens = self._reduce([loss_sum, tokens])
        if total_tokens == 0:
            return None
        return loss_sum / total_tokens

    # ------------------------------------------------------------ checkpoint

    def save_checkpoint(self) -> Path | None:
        """Save this step (every rank takes part); the path on rank 0, None elsewhere.

        A step already saved by this run (or resumed from) is not written twice. Running out of
        disk space, on any rank, raises the same DiskFullError on every rank (checked before
        writing against what all ranks will write, or met while writing), with the temporary
        folder removed and every earlier checkpoint intact.
        """
        step = self.state.step
        if step == self._saved_step:
            return store.checkpoints_root(self.run_dir) / store.step_dir_name(step)
        started = time.monotonic()
        state = self.state_dict()
        root = store.checkpoints_root(self.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        what = f"checkpoint step {step}"
        # Rank 0 measures the free space, every rank adds what it writes: one decision for all.
        free = shutil.disk_usage(root).free if self.is_main else 0
        needed, free = (int(v) for v in self._reduce(
            [store.state_bytes(state, main=self.is_main), free]))
        store.check_free_space(root, needed, what, free=free)
        tmp = store.tmp_dir_for(self.run_dir, step)
        path = None

        def main_files() -> None:
            if self.is_main:
                store.prepare_tmp(self.run_dir, step)
                store.write_state(tmp, state, config_yaml=self.config_yaml,
                                  kernel_plan=self.kernel_plan.to_dict())

        def rank_files() -> None:
            rank = self.acc.process_index
            store.write_rank_rng(tmp, rank, state.rng[rank])

        def shards() -> None:
            self.engine.save_shards(state.shards, tmp)

        def finish() -> None:
            nonlocal path
            if self.is_main:
                path = store.finish_checkpoint(self.run_dir, step)

        stages = [main_files, rank_files, *([shards] if state.shards is not None else []), finish]
        for stage in stages:  # each ends with every rank knowing whether any rank failed
            self._save_stage(stage, tmp, root, needed, what)
        if self.is_main:
            removed = store.apply_retention(self.run_dir, self.cfg.trainer.keep_last_n,
                                            self.state.best_step)
            size_mb = store.checkpoint_bytes(path) / 1e6
            logger.info("saved checkpoint %s (%.1f MB, %.2f s)%s", path, size_mb,
                        time.monotonic() - started,
                        f"; removed {len(removed)} older" if removed else "")
        self.acc.wait_for_everyone()
        self._saved_step = step
        self._last_save_time = time.monotonic()
        return path

    def _save_stage(self, stage, tmp: Path, root: Path, needed: int, what: str) -> None:
        """Run one stage of a save on this rank, then learn in one collective (in place of a
        barrier) whether any rank failed. Then every rank stops the same way: DiskFullError
        when any rank ran out of space, else this rank's own error, else a TrainingError
        pointing at the other ranks' logs; rank 0 removes the temporary folder first."""
        failure = None
        try:
            stage()
        except BaseException as exc:  # torch.distributed.checkpoint raises a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            failure = exc
        failed, full = self._reduce([float(failure is not None),
                                     float(failure is not None and store.is_disk_full(failure))])
        if not failed:
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise store.disk_full(root, needed, what) from None
        if failure is not None:
            raise failure
        raise TrainingError(f"{what} could not be written: another rank failed (its error is in "
                            f"{self.run_dir / 'logs'}). Earlier checkpoints are intact.")

    # ------------------------------------------------------------ the loop

    def _handle_non_finite(self, loss: float, grad_norm: float) -> bool:
        """Return True when the step must be skipped; raise when the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        step = self.state.step + 1
        if self.cfg.trainer.on_nan == "stop":
            raise TrainingError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}. No "
                "checkpoint was written for it; earlier checkpoints are intact. Lower optim.lr, "
                "check the data around this step, or set trainer.on_nan=skip to skip such steps.")
        logger.warning("step %d: non-finite loss/grad norm (%s, %s); skipping the update",
                       step, loss, grad_norm)
        self.state.nan_skipped += 1
        return True

    def fit(self) -> LoopResult:
        """Train until total_steps or a preemption signal (then a checkpoint is saved).

        Host syncs per optimizer step: the loss and the recipe's metrics are read once, after
        the window's backward passes, in the same read (and, with several processes, the same
        collective) as the preemption and save-time flags; the token counts of the window are
        summed before its forward passes (one collective, host-side counts); the gradient norm
        is read for clipping, the non-finite check and the log. See docs/architecture.md.
        """
        accum = self.cfg.trainer.grad_accum_steps
        world = self.acc.num_processes
        feed = BatchFeed(self.data.train, depth=self.cfg.trainer.prefetch,
                         pin=pins_batches(self.acc.device))
        self.model.train()
        try:
            with PreemptionHandler() as preemption:
                while self.state.step < self.total_steps:
                    t0 = time.perf_counter()
                    micro = []
                    for _ in range(accum):
                        batch, self._data_state = feed.next()
                        micro.append(batch)
                    items = sum(self.num_items(b) for b in micro)
                    trained = (items if self.num_items is trained_tokens
                               else sum(trained_tokens(b) for b in micro))
                    counts = self._reduce([items, trained, sum(_input_tokens(b) for b in micro)])
                    window_items, window_trained, input_tokens = map(int, counts)
                    flops = self.monitor.step_flops(micro)  # from the CPU batches: no sync
                    on_device = [to_device(b, self.acc.device) for b in micro]
                    # accelerate's prepare() already wraps the model's forward in autocast.
                    window = accumulate_gradients(
                        self.model, on_device, self.loss_fn, window_tokens=window_items,
                        backward=functools.partial(self.engine.backward, self.acc, self.model),
                        grad_scale=float(world),
                        no_sync=self.engine.no_sync(self.acc, self.model))
                    loss, extra, stop, time_due = self._read_window(
                        window, window_items, preemption.requested is not None)
                    grad_norm = self.engine.clip_grad_norm(self.acc, self.trainable,
                                                           self.cfg.trainer.max_grad_norm)
                    skip = self._handle_non_finite(loss, grad_norm)
                    if not skip:
                        self.optimizer.step()
                    lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    dt = time.perf_counter() - t0
                    self.state.step += 1
                    self.state.tokens_seen += window_trained
                    if self.counts_pairs:
                        self.state.pairs_seen += window_items
                    self.state.elapsed_s += dt
                    self._log_step(loss, lr, grad_norm, window_trained, input_tokens, dt, skip,
                                   extra, feed.take_wait(), flops, window_items)
                    self._maybe_eval()
                    if self.samples is not None:  # every rank: FSDP shards the forward
                        self.samples.maybe_write(self.state.step, self.parts.unwrapped,
                                                 self.parts.tokenizer)
                    every = self.cfg.trainer.save_every_n_steps
                    if stop or time_due or (every and self.state.step % every == 0):
                        self.save_checkpoint()
                    if stop:
                        return LoopResult(self.state, "preempted")
            return LoopResult(self.state, "max_steps")
        finally:
            feed.close()
            if feed.depth and self._data_state is not None:
                self.data.train.load_state_dict(self._data_state)  # back to what was consumed

    def _reduce(self, values: list[float]) -> list[float]:
        """`values` summed over every rank in one collective (as they are with one process)."""
        if self.acc.num_processes == 1:
            return values
        dtype = accumulation_dtype(self.acc.device)
        tensor = torch.tensor(values, dtype=dtype, device=self.acc.device)
        return self.acc.reduce(tensor, reduction="sum").tolist()

    def _read_window(self, window: WindowLoss, window_items: int,
                     preempt: bool) -> tuple[float, dict[str, float], bool, bool]:
        """The step's one read of device values: (loss, recipe metrics, stop, save-time due),
        summed over ranks in one collective. A signal on any rank stops every rank."""
        undeclared = sorted(set(window.metrics) - set(self.recipe_metrics))
        if undeclared:
            raise TypeError(f"the recipe's loss reported {undeclared}, which its Recipe does not "
                            "declare in `metrics`")
        minutes = self.cfg.trainer.save_every_minutes
        time_due = minutes > 0 and time.monotonic() - self._last_save_time >= minutes * 60
        sums = window.loss_sum.reshape(1)
        if self.recipe_metrics:
            zero = torch.zeros_like(window.loss_sum)
            sums = torch.stack([window.loss_sum, *(window.metrics.get(n, zero)
                                                   for n in self.recipe_metrics)])
        if self.acc.num_processes > 1:
            flags = torch.tensor([float(preempt), float(time_due)], dtype=sums.dtype,
                                 device=sums.device)
            values = self.acc.reduce(torch.cat([sums, flags]), reduction="sum").tolist()
            values, preempt, time_due = values[:-2], values[-2] > 0, values[-1] > 0
        else:
            values = sums.tolist()
        loss = values[0] / max(window_items, 1)
        return loss, dict(zip(self.recipe_metrics, values[1:], strict=True)), preempt, time_due

    def _maybe_eval(self) -> None:
        every = self.cfg.trainer.eval_every_n_steps
        at_end = self.state.step == self.total_steps
        if not ((every and self.state.step % every == 0) or at_end):
            return
        eval_loss = self.evaluate()
        if eval_loss is None:
            return
        self.state.last_eval_loss = eval_loss
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss = eval_loss
            if self.cfg.trainer.keep_best_by == "eval_loss":
                self.state.best_step = self.state.step
        self.monitor.eval({"step": self.state.step, "eval_loss": eval_loss})

    def _log_step(self, loss: float, lr: float, grad_norm: float, trained: int,
                  input_tokens: int, dt: float, skipped: bool, extra: dict[str, float],
                  data_wait_s: float, flops: float | None, items: int) -> None:
        if not self.is_main:
            return
        # The monitor adds tokens_per_s, mfu and peak_mem_gb.
        record = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "trained_tokens": trained, "tokens": input_tokens, "step_time_s": dt,
                  "epoch": self._data_position()["epoch"], "data_wait_s": data_wait_s, **extra}
        if self.counts_pairs:
            record["pairs"] = items
        if skipped:
            record["skipped_non_finite"] = True
        self.monitor.step(record, flops=flops)

    def close(self) -> None:
        self.monitor.close()
