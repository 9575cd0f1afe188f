"""The unit layer's tracker config fixture."""

from tests.unit.metrics.conftest import logger_cfg  # noqa: F401 (a fixture)
