"""Unit tests share one process: accelerate's process-wide state is reset after each test, so a
test that built an Accelerator (with one mixed precision) does not decide the next one's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
