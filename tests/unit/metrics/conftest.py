"""Fixtures for the metrics tests: logger configs and a stand-in `wandb` module."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def logger_cfg() -> Callable[..., object]:
    """logger_cfg(**fields): the `logger` group as a run gets it (OmegaConf-checked, Enums)."""
    from omegaconf import OmegaConf

    from finetune.config.schema import LoggerConfig

    return lambda **fields: OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(LoggerConfig), fields))


class FakeWandb(types.ModuleType):
    """Records what WandbLogger hands to `wandb` (init kwargs, logged rows, finish calls)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: dict = {}
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0
        self.run = types.SimpleNamespace(id=None, summary={})

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        self.run.id = kwargs["id"] or "fresh-run-id"
        return self.run

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    """Replace the `wandb` package for this test with a FakeWandb recorder."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake
