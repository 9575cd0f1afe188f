"""Named simulated profiles."""

from __future__ import annotations

import json

import pytest

from finetune.hardware import OPTIONAL_PACKAGES, PROFILE_NAMES, profile_by_name

REQUIRED = {
    "cpu", "mps", "xpu-max1550", "t4", "v100", "a100", "l40s", "rtx4090", "h100", "h200",
    "gh200", "b200", "rtx5090", "mi250x", "mi300x", "mi300a", "mi325x", "mi355x", "rx7900xtx",
    "rx9070",
}

# name -> (vendor, arch, runtime kind, unified memory)
EXPECTED = {
    "cpu": ("cpu", "cpu", "cpu", False),
    "mps": ("apple", "mps", "mps", True),
    "xpu-max1550": ("intel", "xpu", "xpu", False),
    "t4": ("nvidia", "sm_75", "cuda", False),
    "h100": ("nvidia", "sm_90", "cuda", False),
    "gh200": ("nvidia", "sm_90", "cuda", True),
    "b200": ("nvidia", "sm_100", "cuda", False),
    "rtx5090": ("nvidia", "sm_120", "cuda", False),
    "mi250x": ("amd", "gfx90a", "rocm", False),
    "mi300a": ("amd", "gfx942", "rocm", True),
    "mi355x": ("amd", "gfx950", "rocm", False),
    "rx9070": ("amd", "gfx1201", "rocm", False),
}


def test_every_required_profile_exists() -> None:
    assert REQUIRED <= set(PROFILE_NAMES)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profiles_are_simulated_and_serialisable(name: str) -> None:
    profile = profile_by_name(name)
    assert profile.simulated and profile.profile_name == name
    assert profile.packages == frozenset()
    json.dumps(profile.to_dict())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_facts(name: str) -> None:
    profile = profile_by_name(name)
    vendor, arch, runtime, unified = EXPECTED[name]
    assert (profile.vendor, profile.arch, profile.unified_memory) == (vendor, arch, unified)
    assert profile.runtime.split()[0] == runtime
    if vendor == "amd":
        assert profile.compute_capability is None


def test_assume_packages_all() -> None:
    assert profile_by_name("a100", "all").packages == frozenset(OPTIONAL_PACKAGES)


def test_unknown_profile_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid profiles: .*h100.*mi300x"):
        profile_by_name("h1000")


def test_bad_assume_packages_value() -> None:
    with pytest.raises(ValueError, match="assume_packages"):
        profile_by_name("h100", "some")


def test_with_packages_marks_profile_simulated() -> None:
    from dataclasses import replace

    real = replace(profile_by_name("cpu"), simulated=False)
    assert real.with_packages(frozenset()) is real
    assumed = real.with_packages(frozenset(OPTIONAL_PACKAGES))
    assert assumed.simulated is True
    with pytest.raises(ValueError, match="unknown optional packages"):
        real.with_packages({"not_a_package"})
