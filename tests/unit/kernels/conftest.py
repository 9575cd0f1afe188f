"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest

from finetune.hardware import detect


@pytest.fixture(scope="module")
def cpu_profile():
    """This machine's profile, for tests that plan and self-check on the CPU."""
    profile = detect()
    if profile.vendor != "cpu":
        pytest.skip("these tests plan and self-check on this machine's CPU")
    return profile
