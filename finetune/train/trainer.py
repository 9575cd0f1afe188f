"""The one training loop: token-normalised gradient accumulation on accelerate, evaluation,
metrics, checkpoints and preemption. Recipes only choose the loss function."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.checkpoint import store
from finetune.config.schema import RunConfig
from finetune.errors import TrainingError
from finetune.metrics.writers import ConsoleProgress, MetricsFile
from finetune.train.loss import LossFn, accumulate_gradients, trained_tokens
from finetune.train.signals import PreemptionHandler

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything that advances with the steps and must survive a resume."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    nan_skipped: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None


@dataclass
class LoopResult:
    state: LoopState
    stopped_by: str  # "max_steps" | "preempted"


def _to_device(batch: dict, device: torch.device) -> dict:
    # Tensors and flex-attention BlockMasks both move with .to(device).
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _input_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


class Trainer:
    """Runs optimizer steps until `total_steps`, a preemption signal, or a NaN stop."""

    def __init__(self, *, cfg: RunConfig, accelerator, model, optimizer, scheduler, data,
                 loss_fn: LossFn, run_dir: Path, total_steps: int, state: LoopState,
                 checkpoint_payload, flops_per_token: float | None,
                 peak_flops: float | None, wandb=None) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.loss_fn = loss_fn
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.state = state
        self.checkpoint_payload = checkpoint_payload  # callable(state) -> CheckpointPayload
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.wandb = wandb
        self.is_main = accelerator.is_main_process
        self.metrics = MetricsFile(run_dir / "metrics.jsonl") if self.is_main else None
        self.progress = ConsoleProgress(total_steps) if self.is_main else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._val_batches: list[dict] | None = None
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------ helpers

    def _reduce_sum(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(tensor, reduction="sum").item())

    def _any_rank(self, flag: bool) -> bool:
        return self._reduce_sum(1.0 if flag else 0.0) > 0

    def _clip_grad_norm(self) -> float:
        max_norm = self.cfg.trainer.max_grad_norm
        if max_norm > 0:
            return float(self.acc.clip_grad_norm_(self.trainable, max_norm))
        norms = [p.grad.detach().norm(2) for p in self.trainable if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

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
            n = trained_tokens(batch)
            if n == 0:
                continue
            loss = self.loss_fn(model, _to_device(batch, self.acc.device),
                                torch.tensor(float(n)))
            loss_sum += float(loss) * n
            tokens += n
        model.train()
        total_tokens = self._reduce_sum(tokens)
        if total_tokens == 0:
            return None
        return self._reduce_sum(loss_sum) / total_tokens

    # ------------------------------------------------------------ checkpoint

    def save_checkpoint(self) -> Path | None:
        step = self.state.step
        final = store.checkpoints_root(self.run_dir) / store.step_dir_name(step)
        if final.exists():
            return final
        started = time.monotonic()
        if self.is_main:
            tmp = store.prepare_tmp(self.run_dir, step)
            store.write_payload(tmp, self.checkpoint_payload(self.state))
        self.acc.wait_for_everyone()
        store.write_rank_rng(store.tmp_dir_for(self.run_dir, step), self.acc.process_index)
        self.acc.wait_for_everyone()
        path = None
        if self.is_main:
            path = store.finish_checkpoint(self.run_dir, step)
            removed = store.apply_retention(self.run_dir, self.cfg.trainer.keep_last_n,
                                            self.state.best_step)
            size_mb = store.checkpoint_bytes(path) / 1e6
            logger.info("saved checkpoint %s (%.1f MB, %.2f s)%s", path, size_mb,
                        time.monotonic() - started,
                        f"; removed {len(removed)} older" if removed else "")
        self.acc.wait_for_everyone()
        self._last_save_time = time.monotonic()
        return path

    def _save_due(self) -> bool:
        every = self.cfg.trainer.save_every_n_steps
        if every and self.state.step % every == 0:
            return True
        minutes = self.cfg.trainer.save_every_minutes
        if minutes > 0:
            due = time.monotonic() - self._last_save_time >= minutes * 60
            return self._any_rank(due)
        return False

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
        accum = self.cfg.trainer.grad_accum_steps
        world = self.acc.num_processes
        batches = iter(self.data.train)
        session_steps = 0
        self.model.train()
        with PreemptionHandler() as preemption:
            while self.state.step < self.total_steps:
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(accum)]
                local_tokens = sum(trained_tokens(b) for b in micro)
                window_tokens = int(self._reduce_sum(local_tokens))
                input_tokens = int(self._reduce_sum(sum(_input_tokens(b) for b in micro)))
                on_device = [_to_device(b, self.acc.device) for b in micro]

                def backward(loss: torch.Tensor) -> None:
                    self.acc.backward(loss)

                # accelerate's prepare() already wraps the model's forward in autocast.
                loss_sum = accumulate_gradients(
                    self.model, on_device, self.loss_fn, window_tokens=window_tokens,
                    backward=backward, grad_scale=float(world),
                    no_sync=(lambda: self.acc.no_sync(self.model)) if world > 1 else None)
                loss = self._reduce_sum(loss_sum) / max(window_tokens, 1)
                grad_norm = self._clip_grad_norm()
                skip = self._handle_non_finite(loss, grad_norm)
                if not skip:
                    self.optimizer.step()
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                self.state.step += 1
                self.state.tokens_seen += window_tokens
                self.state.elapsed_s += dt
                session_steps += 1
                self._log_step(loss, lr, grad_norm, window_tokens, input_tokens, dt, skip,
                               session_steps)
                self._maybe_eval()
                stop = self._any_rank(preemption.requested is not None)
                if stop or self._save_due():
                    self.save_checkpoint()
                if stop:
                    return LoopResult(self.state, "preempted")
        return LoopResult(self.state, "max_steps")

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
        record = {"step": self.state.step, "eval_loss": eval_loss}
        if self.is_main:
            self.metrics.write(record)
            self.progress.line(f"eval at step {self.state.step}: loss {eval_loss:.4f}")
            if self.wandb is not None:
                self.wandb.log(record)

    def _log_step(self, loss: float, lr: float, grad_norm: float, trained: int,
                  input_tokens: int, dt: float, skipped: bool, session_steps: int) -> None:
        if not self.is_main:
            return
        tokens_per_s = input_tokens / dt if dt > 0 else 0.0
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.acc.num_processes)
        record = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "trained_tokens": trained, "tokens": input_tokens,
                  "tokens_per_s": tokens_per_s, "step_time_s": dt,
                  "epoch": self.data.train.epoch, "mfu": mfu}
        if skipped:
            record["skipped_non_finite"] = True
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record)
        every = self.cfg.trainer.log_every_n_steps
        if self.state.step % every == 0 or self.state.step == self.total_steps:
            self.progress.step(record, session_steps)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
