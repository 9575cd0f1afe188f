"""A real Trainer built in-process on the tiny model (the unit layer's fixture)."""

from tests.unit.train.conftest import make_trainer  # noqa: F401 (a fixture)
