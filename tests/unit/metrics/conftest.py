"""Fixtures for the metrics tests: logger configs, stand-in `wandb` and `mlflow` modules, and a
stand-in Accelerator that keeps what a RunMonitor hands it."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def logger_cfg() -> Callable[..., object]:
    """logger_cfg(**fields): the `logger` group as a run gets it (OmegaConf-checked, Enums)."""
    from omegaconf import OmegaConf

    from finetune.config.schema import LoggerConfig

    return lambda **fields: OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(LoggerConfig), fields))


class FakeRun:
    """What `wandb.init` returns: records config, rows, metric definitions and the summary."""

    def __init__(self, run_id: str, settings: types.SimpleNamespace) -> None:
        self.id = run_id
        self.settings = settings
        self.summary: dict = {}
        self.config = types.SimpleNamespace(values={}, update=self._update)
        self.rows: list[dict] = []
        self.metrics: list[tuple] = []
        self.finished = 0

    def _update(self, values: dict, allow_val_change: bool = False) -> None:
        self.config.values.update(values)

    def define_metric(self, name: str, **kwargs) -> None:
        self.metrics.append((name, kwargs))

    def log(self, data: dict, step: int | None = None) -> None:
        self.rows.append(data)

    def finish(self, exit_code: int | None = None) -> None:
        self.finished += 1


class FakeWandb(types.ModuleType):
    """Records what finetune hands to `wandb`: every init's kwargs and the runs. `fail_online`
    makes an online init raise (a server that does not answer)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.runs: list[FakeRun] = []
        self.fail_online = False
        self.logged: list[tuple[dict, int]] = []  # module-level wandb.log (WandbLogger)
        self.finished = 0

    @property
    def init_kwargs(self) -> dict:
        return self.inits[-1]

    @property
    def run(self) -> FakeRun:
        return self.runs[-1]

    def init(self, **kwargs) -> FakeRun:
        self.inits.append(kwargs)
        if self.fail_online and kwargs.get("mode", "online") == "online":
            raise TimeoutError("no answer from the W&B server")
        sync_dir = Path(kwargs.get("dir") or ".") / "wandb" / "offline-run-x"
        self.runs.append(FakeRun(kwargs.get("id") or "fresh-run-id",
                                 types.SimpleNamespace(mode=kwargs.get("mode"),
                                                       sync_dir=str(sync_dir))))
        return self.runs[-1]

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished += 1

    @staticmethod
    def Table(columns: list[str], data: list[list]) -> dict:  # noqa: N802 (wandb's name)
        return {"columns": columns, "data": data}

    @staticmethod
    def Image(path: str) -> dict:  # noqa: N802 (wandb's name)
        return {"image": path}


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    """Replace the `wandb` package for this test with a FakeWandb recorder."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


@pytest.fixture
def no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No W&B credentials anywhere: no key variables, an empty netrc."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))


class FakeAccelerator:
    """The parts of accelerate.Accelerator a RunMonitor uses, on CPU, with `log_with` trackers
    started the way accelerate starts them (`init_trackers`)."""

    def __init__(self, trackers: list | None = None, *, main: bool = True,
                 processes: int = 1) -> None:
        self.is_main_process = main
        self.num_processes = processes
        self.device = torch.device("cpu")
        self.log_with = list(trackers or [])
        self.trackers: list = []
        self.logged: list[tuple[dict, int | None]] = []
        self.init_args: tuple | None = None

    def init_trackers(self, project_name: str, config: dict | None = None) -> None:
        self.init_args = (project_name, config)
        self.trackers = list(self.log_with)
        for tracker in self.trackers:
            tracker.start()
            if config is not None:
                tracker.store_init_configuration(config)

    def log(self, values: dict, step: int | None = None) -> None:
        if self.is_main_process:
            self.logged.append((values, step))
            for tracker in self.trackers:
                tracker.log(values, step=step)
