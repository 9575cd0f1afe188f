"""Experiment trackers, through accelerate's tracking API: W&B, TensorBoard and MLflow.

`build_trackers(cfg.logger, run_dir)` returns accelerate `GeneralTracker`s, handed to
`Accelerator(log_with=...)`; `RunMonitor` starts them with `accelerator.init_trackers` and logs
through `accelerator.log`. Each class extends accelerate's own tracker with what a run needs:
only rank 0 logs; the config and the kernel plan are recorded; the end-of-run summary and
report are attached; `finish` runs once; a resumed run continues the same W&B (and MLflow) run.
W&B never hangs or stops a run for want of a key or network: it logs offline and says how to
sync. No tracker reads or writes an API key: W&B finds its own, we only check one exists.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker, on_main_process

from finetune.config.schema import LoggerConfig, LoggerName
from finetune.errors import ConfigError

logger = logging.getLogger(__name__)

WANDB_HOST = "https://api.wandb.ai"
TB_DIR = "tb"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (`optim.lr`); lists and None become text, so
    every value is a number, a bool or a string (what TensorBoard's and MLflow's params take)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value.value if hasattr(value, "value") else value
        else:
            flat[name] = str(value)
    return flat


def numbers(record: dict[str, Any]) -> dict[str, float | int]:
    """The finite numeric values of a record (None, NaN, text and lists left out)."""
    return {k: v for k, v in record.items()
            if isinstance(v, int | float) and not (isinstance(v, float) and not math.isfinite(v))}


def kernel_rows(kernel_plan: dict[str, Any]) -> list[list[str]]:
    """One row per op family of kernel_plan.json: family, choice, reason, self-check, and the
    rejected candidates with their reasons."""
    rows = []
    for family, decision in kernel_plan.get("kernels", {}).items():
        rejected = "; ".join(f"{r['name']}: {r['reason']}" for r in decision.get("rejected", []))
        rows.append([family, str(decision.get("choice")), str(decision.get("reason", "")),
                     str(decision.get("selfcheck", "")), rejected])
    return rows


# ---------------------------------------------------------------------------------- W&B


def _wandb_key_present(host: str) -> bool:
    """Whether W&B has credentials to use: WANDB_API_KEY, an identity token file, or a netrc
    entry for the host (what `wandb login` writes). The key itself is never read here."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hostname = urlparse(host).hostname or host
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout_s: float) -> bool:
    """A TCP connection to the host's port opens within `timeout_s` (DNS included: the attempt
    runs on a thread that is abandoned when it takes longer)."""
    parsed = urlparse(host)
    address = (parsed.hostname or host, parsed.port or (80 if parsed.scheme == "http" else 443))
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True, name="finetune-wandb-probe")
    thread.start()
    thread.join(timeout_s + 1.0)
    return bool(result and result[0])


def wandb_offline_reason(timeout_s: float = 3.0) -> str | None:
    """Why W&B cannot log online from here (no key, host unreachable), or None."""
    host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    if not _wandb_key_present(host):
        return "no W&B API key (log in with `wandb login` or set WANDB_API_KEY)"
    if not _reachable(host, timeout_s):
        return f"{host} cannot be reached"
    return None


class _FinishOnce:
    """`finish` runs once, whether the monitor or accelerate's end_training calls it first."""

    _finished = False

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        super().finish()


class WandbTracker(_FinishOnce, WandBTracker):
    """W&B on rank 0, in OUTPUT_DIR/wandb/."""

    main_process_only = True
    resume_key = "wandb_run_id"

    def __init__(self, cfg: LoggerConfig, run_dir: Path) -> None:
        super().__init__(cfg.project)
        self.cfg, self.run_dir = cfg, run_dir
        self.resume_id: str | None = None
        self.run: Any = None

    def resume(self, run_id: str | None) -> None:
        """Continue this W&B run (call before start)."""
        self.resume_id = run_id

    def current_run_id(self) -> str | None:
        return self.run.id if self.run is not None else self.resume_id

    @on_main_process
    def start(self) -> None:
        import wandb

        mode = str(self.cfg.mode)
        reason = wandb_offline_reason() if mode == "online" else None
        if reason:
            mode = "offline"
        kwargs = dict(project=self.cfg.project, entity=self.cfg.entity,
                      name=self.cfg.run_name or self.run_dir.name, tags=list(self.cfg.tags),
                      dir=str(self.run_dir), id=self.resume_id,
                      resume="allow" if self.resume_id else None)
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # wandb raises its own error types for a failed online start
            if mode != "online":
                raise
            reason, mode = f"W&B did not start online ({type(exc).__name__}: {exc})", "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        if reason:
            sync_dir = getattr(self.run.settings, "sync_dir", None) or self.run_dir / "wandb"
            logger.warning("W&B: %s; logging offline to %s. Sync it later with `wandb sync %s`",
                           reason, sync_dir, sync_dir)
        # Plot against our step, so a resumed run may log steps W&B already holds.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.run.log({**values, "step": step} if step is not None else values, **kwargs)

    @on_main_process
    def describe(self, kernel_plan: dict[str, Any]) -> None:
        """The kernel plan as a table (it is in the config too)."""
        import wandb

        table = wandb.Table(columns=["family", "choice", "reason", "self-check", "rejected"],
                            data=kernel_rows(kernel_plan))
        self.run.log({"kernel_plan": table})

    @on_main_process
    def log_summary(self, summary: dict[str, Any], report: Path | None) -> None:
        """The run's figures as the W&B run summary, and the report figure as an image."""
        import wandb

        for key, value in flatten(summary).items():
            self.run.summary[key] = value
        if report is not None and report.is_file():
            self.run.log({"report": wandb.Image(str(report))})


# ---------------------------------------------------------------------------------- TensorBoard


class TensorboardTracker(_FinishOnce, TensorBoardTracker):
    """Event files in OUTPUT_DIR/tb/ (scalars per step, the config as hparams and text)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(TB_DIR, str(run_dir))

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        import json

        from torch.utils.tensorboard.summary import hparams

        # Into this run's own event file (SummaryWriter.add_hparams would open a second one).
        for part in hparams(flatten(values), {}):
            self.writer.file_writer.add_summary(part)
        self.writer.add_text("config", f"```\n{json.dumps(values, indent=2, default=str)}\n```")
        self.writer.flush()

    @on_main_process
    def describe(self, kernel_plan: dict[str, Any]) -> None:
        header = "| family | choice | reason | self-check | rejected |\n|---|---|---|---|---|\n"
        rows = "".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |\n"
                       for row in kernel_rows(kernel_plan))
        self.writer.add_text("kernel_plan", header + rows)
        self.writer.flush()

    @on_main_process
    def log_summary(self, summary: dict[str, Any], report: Path | None) -> None:
        lines = "".join(f"| {k} | {v} |\n" for k, v in flatten(summary).items())
        self.writer.add_text("summary", "| key | value |\n|---|---|\n" + lines)
        self.writer.flush()


# ---------------------------------------------------------------------------------- MLflow


class MlflowTracker(_FinishOnce, MLflowTracker):
    """MLflow on rank 0: MLFLOW_TRACKING_URI, else a store of this run in OUTPUT_DIR
    (mlflow.db, artifacts in mlartifacts/)."""

    main_process_only = True
    resume_key = "mlflow_run_id"

    def __init__(self, cfg: LoggerConfig, run_dir: Path) -> None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        root = run_dir.resolve()
        super().__init__(experiment_name=cfg.project, run_name=cfg.run_name or run_dir.name,
                         tags={tag: "" for tag in cfg.tags} or None,
                         logging_dir=(root / "mlartifacts").as_uri() if local else None)
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}" if local else None

    def resume(self, run_id: str | None) -> None:
        """Continue this MLflow run (call before start); MLFLOW_RUN_ID, when set, wins."""
        if run_id and not os.environ.get("MLFLOW_RUN_ID"):
            self.run_id = run_id  # accelerate's start passes it to mlflow.start_run

    def current_run_id(self) -> str | None:
        active = getattr(self, "active_run", None)
        return active.info.run_id if active is not None else self.run_id

    @on_main_process
    def start(self) -> None:
        import mlflow

        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        super().start()

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        import mlflow

        # MLflow params are short strings: long ones (kernel reasons) are cut, not dropped.
        params = {k: str(v)[:500] for k, v in flatten(values).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))

    @on_main_process
    def describe(self, kernel_plan: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_dict(kernel_plan, "kernel_plan.json")

    @on_main_process
    def log_summary(self, summary: dict[str, Any], report: Path | None) -> None:
        import mlflow

        mlflow.log_dict(summary, "summary.json")
        if report is not None and report.is_file():
            mlflow.log_artifact(str(report))


# ---------------------------------------------------------------------------------- build

_PACKAGES = {LoggerName.wandb: ("wandb", "wandb"),
             LoggerName.tensorboard: ("tensorboard", "'finetune[tensorboard]'"),
             LoggerName.mlflow: ("mlflow", "'finetune[mlflow]'")}


def build_trackers(cfg: LoggerConfig, run_dir: Path) -> list[Any]:
    """The trackers `cfg` switches on, not started (for `Accelerator(log_with=...)`).

    Raises ConfigError naming the package to install when a tracker's package is missing
    (accelerate would skip such a tracker silently).
    """
    import importlib.util

    trackers: list[Any] = []
    for name in cfg.trackers():
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger {name} needs the {module} package, which is not "
                              f"installed: pip install {install} (or remove {name} from logger)")
        if name == LoggerName.wandb:
            trackers.append(WandbTracker(cfg, run_dir))
        elif name == LoggerName.tensorboard:
            trackers.append(TensorboardTracker(run_dir))
        else:
            trackers.append(MlflowTracker(cfg, run_dir))
    return trackers
