"""In-process tests that build, train or export a model on the tiny model: seconds each, so they
live apart from the fast unit layer. They share the unit layer's process hygiene."""

from tests.unit.conftest import _fresh_accelerator_state  # noqa: F401 (an autouse fixture)
