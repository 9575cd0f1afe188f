"""RunMonitor: the one object a run reports to, so the loop never deals with where figures go.

It writes metrics.jsonl, completes each step record (tokens/s, MFU, peak memory), drives the
console (start banner, live or plain step display, end summary), logs to the trackers the
Accelerator was built with (`trackers.build_trackers`), writes report.png at the end, and hands
checkpoints the tracker run ids a resume continues. Only rank 0 shows or writes anything; the
other ranks' calls return at once. Nothing here reads a device tensor, so logging adds no
device synchronisation to a step.

    monitor = RunMonitor(cfg, run_dir, accelerator, kernel_plan)
    monitor.print_plan()                              # before the model and data load
    monitor.start(model, total_steps=..., start_step=..., data_stats=..., config=...,
                  resumed=checkpoint_progress)        # trackers started, banner, display
    flops = monitor.step_flops(micro_batches)         # CPU batches, before they move
    monitor.step(record, flops=flops); monitor.eval({"step": s, "eval_loss": x})
    monitor.finish(summary, final_dir); monitor.close()
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from finetune.adapters.lora import count_parameters
from finetune.config.schema import RunConfig
from finetune.errors import ConfigError
from finetune.kernels import KernelPlan, format_plan_table
from finetune.metrics.banner import key_settings, print_end, print_plan, print_rows, summary_rows
from finetune.metrics.display import StepDisplay, make_console, make_display, plain, wants_live
from finetune.metrics.flops import FlopCounter, TrainingMode
from finetune.metrics.memory import memory_source, peak_memory_gb
from finetune.metrics.trackers import numbers
from finetune.metrics.writers import MetricsFile, read_records

logger = logging.getLogger(__name__)

REPORT_NAME = "report.png"
RESUME_KEYS = ("wandb_run_id", "mlflow_run_id")


def peak_flops(kernel_plan: KernelPlan) -> float | None:
    """One device's peak FLOP/s for MFU: the profile's bf16 peak when the run trains in bf16;
    None when the peak is unknown or the run uses another precision (no peak is tabulated)."""
    peak = kernel_plan.hardware.peak_bf16_tflops
    return peak * 1e12 if peak and kernel_plan.precision == "bf16" else None


class RunMonitor:
    """See the module docstring. `accelerator` is the run's accelerate.Accelerator, built with
    `log_with=build_trackers(cfg.logger, run_dir)`; `console` defaults to stdout."""

    def __init__(self, cfg: RunConfig, run_dir: Path, accelerator: Any, kernel_plan: KernelPlan,
                 *, console: Console | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.kernel_plan = kernel_plan
        self.is_main = accelerator.is_main_process
        self.console = console or make_console()
        self.rich = wants_live(cfg.logger.display, self.console)
        self.peak_flops = peak_flops(kernel_plan)
        measured = kernel_plan.measured_tflops
        self.measured_flops = measured * 1e12 if measured else None
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl") if self.is_main else None
        self.display: StepDisplay | None = None
        self.flops: FlopCounter | None = None
        self._resumed: dict[str, str | None] = {}
        self._finished = False

    # ------------------------------------------------------------------ start

    def print_plan(self) -> None:
        """The run's first lines: title, output directory, hardware and kernel plan."""
        if self.is_main:
            print_plan(self.console, rich=self.rich,
                       title=f"finetune {self.cfg.recipe}: output_dir={self.run_dir}",
                       plan_text=format_plan_table(self.kernel_plan))

    def start(self, model: torch.nn.Module, *, total_steps: int, start_step: int,
              data_stats: dict[str, Any], config: dict[str, Any],
              resumed: dict[str, Any] | None = None) -> None:
        """Before the first step: count the model's FLOPs (when MFU can be known), start the
        trackers with the config and the kernel plan (continuing the runs whose ids `resumed`,
        the checkpoint's progress dict, holds), print the key settings, start the display.

        `model` is the unwrapped model (a peft model for adapter runs).
        """
        if self.peak_flops is not None or self.measured_flops is not None:
            self.flops = FlopCounter(model.config, TrainingMode.of(model),
                                     head_at_loss_positions=_head_at_loss_positions(
                                         self.cfg.recipe, model))
            if not self.flops.known:
                logger.info("MFU unknown: the FLOP count covers dense decoder models with "
                            "the usual config attributes, not %s",
                            getattr(model.config, "model_type", "this model"))
        self._resumed = {key: (resumed or {}).get(key) for key in RESUME_KEYS}
        self._start_trackers(config)
        if not self.is_main:
            return
        trainable, total = count_parameters(model)
        display = make_display(self.cfg.logger.display, total_steps=total_steps,
                               start_step=start_step,
                               log_every=self.cfg.trainer.log_every_n_steps,
                               console=self.console)
        rows = key_settings(self.cfg, parameters=(trainable, total),
                            world_size=self.accelerator.num_processes, start_step=start_step,
                            total_steps=total_steps, data_stats=data_stats,
                            trackers=[str(name) for name in self.cfg.logger.trackers()],
                            display="live" if self.rich else "plain")
        print_rows(self.console, rows, rich=self.rich, title="settings")
        self.display = display
        display.start()

    def _start_trackers(self, config: dict[str, Any]) -> None:
        for tracker in self.accelerator.log_with:
            key = getattr(tracker, "resume_key", None)
            if key:
                tracker.resume(self._resumed.get(key))
        plan = self.kernel_plan.to_dict()
        try:
            self.accelerator.init_trackers(self.cfg.logger.project,
                                           config={**config, "kernel_plan": plan})
            for tracker in self.accelerator.trackers:
                tracker.describe(plan)
        except Exception as exc:
            self._abandon_trackers()
            names = ", ".join(str(name) for name in self.cfg.logger.trackers())
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ConfigError(
                f"the tracker ({names}) did not start: {detail[:400]}. The run stopped before "
                "its first step and left output_dir as it found it. Fix the tracker's settings "
                "(logger.* keys, its environment variables such as WANDB_MODE, its server's "
                "address), or run without it: logger=console.") from None

    # ------------------------------------------------------------------ each step

    def step_flops(self, micro_batches: list[dict]) -> float | None:
        """Model FLOPs of a step's micro-batches on this rank (CPU batches: call it before they
        move to the device); None on other ranks or when MFU cannot be known."""
        if not self.is_main or self.flops is None:
            return None
        return self.flops.step(micro_batches)

    def step(self, record: dict[str, Any], flops: float | None = None) -> None:
        """One optimizer step's record (step, loss, lr, grad_norm, tokens, trained_tokens,
        step_time_s, data_wait_s, epoch, the recipe's metrics...): tokens_per_s, mfu and
        peak_mem_gb are added, then it goes to metrics.jsonl, the trackers and the display.

        MFU is rank 0's: its batches' FLOPs over the step time and one device's peak. Ranks
        step together on equal shares, so it stands for the run without a collective.
        `mfu_measured` divides by the device's measured dense matmul rate instead
        (kernels.autotune measures it, in the run's precision); None where it was not measured.
        """
        if not self.is_main:
            return
        seconds = record["step_time_s"]
        record = {**record, "tokens_per_s": record["tokens"] / seconds if seconds > 0 else 0.0,
                  "mfu": (flops / seconds / self.peak_flops
                          if flops and self.peak_flops and seconds > 0 else None),
                  "mfu_measured": (flops / seconds / self.measured_flops
                                   if flops and self.measured_flops and seconds > 0 else None),
                  "peak_mem_gb": round(peak_memory_gb(self.accelerator.device), 3)}
        self.metrics.write(record)
        self.accelerator.log(numbers(record), step=record["step"])
        if self.display is not None:
            self.display.update(record)

    def eval(self, record: dict[str, Any]) -> None:
        """An evaluation's record ({"step", "eval_loss", ...}) to metrics.jsonl, the trackers
        and the display."""
        if not self.is_main:
            return
        self.metrics.write(record)
        self.accelerator.log(numbers(record), step=record["step"])
        if self.display is not None:
            self.display.eval(record)
        else:
            self.line(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}")

    def line(self, text: str) -> None:
        """A message for the user, printed on rank 0 (above the live display when it is up)."""
        if not self.is_main:
            return
        if self.display is not None:
            self.display.line(text)
        else:
            plain(self.console, text)

    # ------------------------------------------------------------------ end

    def state_dict(self) -> dict[str, str | None]:
        """The tracker run ids a resume continues ({"wandb_run_id", "mlflow_run_id"}), for the
        checkpoint's progress; an id carried from the checkpoint stays when its tracker is off."""
        ids = dict(self._resumed) or dict.fromkeys(RESUME_KEYS)
        for tracker in self.accelerator.trackers:
            key = getattr(tracker, "resume_key", None)
            if key:
                ids[key] = tracker.current_run_id()
        return ids

    def finish(self, summary: dict[str, Any], final: Path) -> None:
        """The run completed: write report.png, hand the trackers the summary and the report,
        close them, and print the end summary (after them, so it is the last thing shown)."""
        if not self.is_main:
            return
        report = self.write_report()
        for tracker in self.accelerator.trackers:
            tracker.log_summary(summary, report)
        self._close_display()
        self._finish_trackers()
        print_end(self.console, summary_rows(summary, run_dir=self.run_dir, final=final),
                  rich=self.rich)

    def write_report(self) -> Path | None:
        """OUTPUT_DIR/report.png from metrics.jsonl; None (with a warning) when it fails, which
        never fails the run, and None with one line naming the [plot] extra where matplotlib
        is not installed."""
        from finetune.metrics.report import PLOT_INSTALL, plot_run, plotting_available

        path = self.run_dir / REPORT_NAME
        if not plotting_available():
            self.line(f"{REPORT_NAME} not drawn: matplotlib is not installed; `{PLOT_INSTALL}` "
                      f"draws it (the figures are in {self.run_dir / 'metrics.jsonl'})")
            return None
        try:
            plot_run(read_records(self.run_dir / "metrics.jsonl"), path,
                     title=f"{self.cfg.recipe}: {self.run_dir.name}",
                     memory_source=memory_source(self.accelerator.device))
        except Exception as exc:  # a plotting problem must not cost the trained model
            logger.warning("report.png not written: %s: %s", type(exc).__name__, exc)
            return None
        return path

    def close(self) -> None:
        """Take the display down, close metrics.jsonl and the trackers (safe to call twice,
        and after a failure)."""
        self._close_display()
        if self.metrics is not None:
            self.metrics.close()
        if self.is_main:
            self._finish_trackers()

    def _close_display(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None

    def _finish_trackers(self) -> None:
        if self._finished:
            return
        self._finished = True
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _abandon_trackers(self) -> None:
        """After a failed start: close what did start, and never finish the rest (a tracker
        that did not start has nothing to finish)."""
        self._finished = True
        for tracker in self.accelerator.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
        self.accelerator.trackers = []


def _head_at_loss_positions(recipe: str, model: torch.nn.Module) -> bool:
    """Whether the run's loss asks the model for the logits of the trained positions only
    (`logits_to_keep`), so that the LM head runs there and nowhere else."""
    from finetune.train.loss import causal_lm_loss, selects_logits
    from finetune.train.recipe import load_recipe

    return load_recipe(recipe).loss is causal_lm_loss and selects_logits(model)
