"""Named simulated profiles."""

from __future__ import annotations

import json

import pytest

from finetune.hardware import OPTIONAL_PACKAGES, PROFILE_NAMES, profile_by_name
from finetune.hardware.profile import VENDORS
from finetune.hardware.simulated import SIMULATED_CUDNN_VERSION, SIMULATED_TRANSFORMERS_VERSION

# name -> (vendor, arch, unified memory). Every shipped profile must be listed
# (a new one states its facts here; a removed one fails its entry).
EXPECTED = {
    "cpu": ("cpu", "cpu", False),
    "cpu-amx": ("cpu", "cpu", False),
    "cpu-avx512bf16": ("cpu", "cpu", False),
    "mps": ("apple", "mps", True),
    "xpu-max1550": ("intel", "xpu", False),
    "t4": ("nvidia", "sm_75", False),
    "v100": ("nvidia", "sm_70", False),
    "a100": ("nvidia", "sm_80", False),
    "l40s": ("nvidia", "sm_89", False),
    "rtx4090": ("nvidia", "sm_89", False),
    "h100": ("nvidia", "sm_90", False),
    "h200": ("nvidia", "sm_90", False),
    "gh200": ("nvidia", "sm_90", True),
    "b200": ("nvidia", "sm_100", False),
    "rtx5090": ("nvidia", "sm_120", False),
    "mi250x": ("amd", "gfx90a", False),
    "mi300x": ("amd", "gfx942", False),
    "mi300a": ("amd", "gfx942", True),
    "mi325x": ("amd", "gfx942", False),
    "mi355x": ("amd", "gfx950", False),
    "rx7900xtx": ("amd", "gfx1100", False),
    "rx9070": ("amd", "gfx1201", False),
}
# The `hardware` block of kernel_plan.json as DESIGN.md documents it.
DOCUMENTED_KEYS = {"vendor", "arch", "name", "device_count", "memory_gb", "unified_memory",
                   "peak_bf16_tflops", "runtime", "torch"}
RUNTIME_OF_VENDOR = {"nvidia": "cuda", "amd": "rocm", "intel": "xpu", "apple": "mps",
                     "cpu": "cpu"}


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profiles_are_simulated_and_consistent(name: str) -> None:
    profile = profile_by_name(name)
    assert profile.simulated and profile.profile_name == name
    # "none" assumes no separately installed package; GPU builds of torch ship Triton.
    gpu = profile.vendor in ("nvidia", "amd", "intel")
    assert profile.packages == (frozenset({"triton"}) if gpu else frozenset())
    data = profile.to_dict()
    assert json.loads(json.dumps(data)) == data  # nothing is lost on the way to JSON
    assert DOCUMENTED_KEYS <= set(data)
    assert profile.vendor in VENDORS
    assert profile.runtime.split()[0] == RUNTIME_OF_VENDOR[profile.vendor]
    assert profile.device_count >= 1 and profile.memory_gb > 0
    assert profile.peak_bf16_tflops is None or profile.peak_bf16_tflops > 0
    assert profile.transformers == SIMULATED_TRANSFORMERS_VERSION  # fixed: tables are stable
    assert profile.cudnn == (SIMULATED_CUDNN_VERSION if profile.vendor == "nvidia" else None)
    cc = profile.compute_capability
    if profile.vendor == "nvidia":  # the arch and the capability must tell the same story
        assert profile.arch == f"sm_{cc[0]}{cc[1]}"
        assert data["compute_capability"] == f"{cc[0]}.{cc[1]}"
    else:  # ROCm's synthetic capabilities (MI250X says 9.0) are never exposed
        assert cc is None and data["compute_capability"] is None


@pytest.mark.parametrize("name", sorted(set(EXPECTED) | set(PROFILE_NAMES)))
def test_profile_facts(name: str) -> None:
    profile = profile_by_name(name)
    assert (profile.vendor, profile.arch, profile.unified_memory) == EXPECTED[name]


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
