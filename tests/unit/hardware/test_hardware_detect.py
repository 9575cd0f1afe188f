"""Detection from injected device properties: vendor split, arch, unified memory, peak."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import OPTIONAL_PACKAGES, DeviceProperties, detect
from finetune.hardware.detect import (
    GIB,
    cpu_has_amx,
    cpu_has_native_bf16,
    installed_packages,
    profile_from_device_properties,
    read_cpu_flags,
)
from finetune.kernels import plan


def _props(**overrides: object) -> DeviceProperties:
    base = dict(
        is_hip=False, name="NVIDIA A100-SXM4-80GB", gcn_arch_name="NVIDIA A100-SXM4-80GB",
        major=8, minor=0, total_memory=80 * GIB, multi_processor_count=108,
        is_integrated=False, machine="x86_64",
    )
    base.update(overrides)
    return DeviceProperties(**base)  # type: ignore[arg-type]


def _profile(props: DeviceProperties, **kw: object):
    kw.setdefault("packages", frozenset(OPTIONAL_PACKAGES))
    return profile_from_device_properties(
        props, device_count=1, runtime_version="6.4" if props.is_hip else "12.8",
        torch_version="2.10.0", **kw,  # type: ignore[arg-type]
    )


MI250X = _props(
    is_hip=True, name="AMD Instinct MI250X/MI250", gcn_arch_name="gfx90a:sramecc+:xnack-",
    major=9, minor=0, total_memory=64 * GIB, multi_processor_count=110,
)


def test_rocm_mi250x_synthetic_capability_is_not_hopper() -> None:
    profile = _profile(MI250X)
    assert (profile.vendor, profile.arch, profile.runtime) == ("amd", "gfx90a", "rocm 6.4")
    assert profile.compute_capability is None  # the synthetic (9, 0) is dropped
    assert profile.peak_bf16_tflops == 191.5  # per GCD
    assert profile.memory_gb == 64.0
    kernel_plan = plan(profile, KernelsConfig())
    assert kernel_plan.choice("attention") == "flash_attention_2"
    fa3 = {r.name: r.reason for r in kernel_plan.kernels["attention"].rejected}
    assert "Hopper" in fa3["flash_attention_3"]
    assert "sm_90" not in kernel_plan.kernels["precision"].reason
    assert kernel_plan.kernels["precision"].details["tf32"] is False  # hipBLASLt TF32: MI300+


def test_rocm_mi250x_cannot_force_flash_attention_3() -> None:
    from finetune.kernels import KernelOverrideError

    with pytest.raises(KernelOverrideError, match="needs NVIDIA Hopper"):
        plan(_profile(MI250X), KernelsConfig(attention="flash_attention_3"))


def test_mi250_without_x_has_no_peak() -> None:
    assert _profile(replace(MI250X, multi_processor_count=104)).peak_bf16_tflops is None


def test_cuda_build_ignores_gcn_arch_name_alias() -> None:
    profile = _profile(_props(gcn_arch_name="gfx942:sramecc+:xnack-"))
    assert (profile.vendor, profile.arch, profile.compute_capability) == ("nvidia", "sm_80", (8, 0))
    assert profile.runtime == "cuda 12.8"


@pytest.mark.parametrize(
    ("cus", "unified", "peak"), [(228, True, 980.6), (304, False, 1300.0)]
)
def test_mi300a_vs_mi300x_by_compute_units(cus: int, unified: bool, peak: float) -> None:
    props = _props(
        is_hip=True, name="AMD Instinct MI300 Series", gcn_arch_name="gfx942:sramecc+:xnack-",
        major=9, minor=4, total_memory=128 * GIB, multi_processor_count=cus,
    )
    profile = _profile(props)
    assert profile.arch == "gfx942"
    assert profile.unified_memory is unified
    assert profile.peak_bf16_tflops == peak


def test_amd_apu_memory_falls_back_to_host_ram() -> None:
    props = _props(
        is_hip=True, name="AMD Radeon 8060S", gcn_arch_name="gfx1151", major=11, minor=5,
        total_memory=16 * GIB, multi_processor_count=40,
    )
    profile = _profile(props, host_memory_bytes=128 * GIB)
    assert profile.unified_memory is True
    assert profile.memory_gb == 128.0


def test_mi300a_memory_is_per_device_not_the_whole_node() -> None:
    """A 4 x MI300A node's OS sees every APU's HBM as one host RAM; each device has its own
    128 GB (AMD Instinct MI300A data sheet), never the node's total."""
    props = _props(
        is_hip=True, name="AMD Instinct MI300A", gcn_arch_name="gfx942:sramecc+:xnack-",
        major=9, minor=4, total_memory=16 * GIB, multi_processor_count=228, is_integrated=True,
    )
    profile = profile_from_device_properties(
        props, device_count=4, runtime_version="6.4", torch_version="2.10.0",
        host_memory_bytes=4 * 126 * GIB,
    )
    assert profile.unified_memory is True
    assert profile.memory_gb == 126.0
    assert profile.peak_bf16_tflops == 980.6


@pytest.mark.parametrize(
    ("name", "machine", "unified"),
    [("NVIDIA GH200 480GB", "aarch64", True), ("NVIDIA GH200 480GB", "x86_64", False),
     ("NVIDIA H100 80GB HBM3", "aarch64", False)],
)
def test_grace_superchips_are_unified(name: str, machine: str, unified: bool) -> None:
    profile = _profile(_props(name=name, gcn_arch_name=name, major=9, minor=0, machine=machine))
    assert profile.unified_memory is unified


def test_integrated_flag_means_unified() -> None:
    assert _profile(_props(is_integrated=True)).unified_memory is True


@pytest.mark.parametrize(
    ("name", "cc", "peak"),
    [
        ("NVIDIA H100 PCIe", (9, 0), 756.0),
        ("NVIDIA H100 NVL", (9, 0), 835.0),
        ("NVIDIA H100 80GB HBM3", (9, 0), 989.0),
        ("NVIDIA H200", (9, 0), 989.0),  # SXM
        ("NVIDIA H200 NVL", (9, 0), 835.0),  # same 141 GB, lower clocks: told apart by "NVL"
        ("NVIDIA GH200 480GB", (9, 0), 989.0),  # its own row: "H200" must not match "GH200"
        ("NVIDIA GH200 144G HBM3e", (9, 0), 989.0),
        ("NVIDIA GB200", (10, 0), 2500.0),  # "B200" must not match "GB200"
        ("NVIDIA GeForce RTX 3060", (8, 6), None),  # unknown: never a guess
        ("Some Future GPU", (13, 0), None),
    ],
)
def test_peak_table(name: str, cc: tuple[int, int], peak: float | None) -> None:
    profile = _profile(_props(name=name, gcn_arch_name=name, major=cc[0], minor=cc[1]))
    assert profile.peak_bf16_tflops == peak


def test_unknown_amd_gpu_has_no_peak() -> None:
    props = _props(is_hip=True, name="AMD Instinct MI300X VF", gcn_arch_name="gfx942",
                   major=9, minor=4, multi_processor_count=80)
    assert _profile(props).peak_bf16_tflops is None


@pytest.mark.parametrize(
    ("flags", "native", "amx"),
    [("fpu avx2 amx_bf16 amx_tile", True, True), ("fpu avx2 avx512f avx512_bf16", True, False),
     ("fpu sse avx2 avx512f", False, False)],
)
def test_cpu_bf16_from_cpuinfo(tmp_path: Path, flags: str, native: bool, amx: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_native_bf16(read_cpu_flags(cpuinfo)) is native
    assert cpu_has_amx(read_cpu_flags(cpuinfo)) is amx


def test_missing_cpuinfo_means_no_flags(tmp_path: Path) -> None:
    assert read_cpu_flags(tmp_path / "absent") == frozenset()


def _fake_distributions(monkeypatch: pytest.MonkeyPatch, installed: dict[str, list[str]]):
    """Pretend exactly `installed` (distribution -> its files) is installed."""
    import importlib.metadata as metadata
    import types

    def distribution(name: str):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return types.SimpleNamespace(files=installed[name])

    def version(name: str) -> str:
        distribution(name)
        return "1.0"

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setattr(metadata, "version", version)


def test_packages_are_found_by_distribution_not_by_module(monkeypatch) -> None:
    """flash-attn-4 alone makes `flash_attn` a namespace package, which a module lookup reads as
    FA2 (huggingface/transformers#44559): only the distributions count."""
    import importlib.util

    _fake_distributions(monkeypatch, {"flash-attn-4": [], "pytorch-triton-rocm": []})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # every module "found"
    assert installed_packages() == frozenset({"flash-attn-4", "triton"})
    from finetune.kernels import KernelOverrideError

    b200 = replace(
        _profile(_props(name="NVIDIA B200", gcn_arch_name="NVIDIA B200", major=10, minor=0),
                 packages=installed_packages(), cudnn="9.10.2"),
        transformers="5.0.0",
    )
    assert plan(b200, KernelsConfig(), packing=True).choice("attention") == "flash_attention_4"
    with pytest.raises(KernelOverrideError, match="needs the flash-attn package"):
        plan(b200, KernelsConfig(attention="flash_attention_2"))


def test_broken_distribution_metadata_counts_as_absent(monkeypatch) -> None:
    import importlib.metadata as metadata

    def version(name: str) -> str:
        if name == "deepspeed":
            raise ValueError("damaged METADATA")
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert installed_packages() == frozenset()


@pytest.mark.parametrize(("files", "module_found", "build"), [
    (["flash_attn/__init__.py", "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so"], False,
     "compiled"),
    (["flash_attn/__init__.py", "flash_attn/flash_attn_triton_amd/interface_fa.py"], False,
     "triton"),
    (["flash_attn/__init__.py"], True, "compiled"),  # editable install: extension not listed
])
def test_flash_attn_build(monkeypatch, files: list[str], module_found: bool, build: str) -> None:
    import importlib.util

    from finetune.hardware.detect import flash_attn_build

    _fake_distributions(monkeypatch, {"flash-attn": files})
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if module_found else None)
    assert flash_attn_build() == build


def test_flash_attn_build_without_flash_attn(monkeypatch) -> None:
    from finetune.hardware.detect import flash_attn_build

    _fake_distributions(monkeypatch, {"flash-attn-4": []})
    assert flash_attn_build() is None


def test_detect_this_machine_is_real_and_serialisable() -> None:
    import importlib.metadata

    profile = detect()
    assert profile.simulated is False
    assert profile.torch == torch.__version__.split("+")[0]
    assert profile.transformers == importlib.metadata.version("transformers")
    data = json.loads(json.dumps(profile.to_dict()))
    for key in ("vendor", "arch", "name", "device_count", "memory_gb", "unified_memory",
                "peak_bf16_tflops", "runtime", "torch"):
        assert key in data
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert (profile.vendor, profile.arch, profile.runtime) == ("cpu", "cpu", "cpu")
        assert profile.compute_capability is None


@pytest.mark.parametrize(("raw", "text"), [(91002, "9.10.2"), (90100, "9.1.0"), (8902, "8.9.2")])
def test_cudnn_version_string(raw: int, text: str) -> None:
    from finetune.hardware.detect import cudnn_version_string

    assert cudnn_version_string(raw) == text


@pytest.mark.parametrize(("cudnn", "backend"), [(None, "flash"), ("9.10.2", "flash"),
                                                ("9.16.0", "cudnn")])
def test_sdpa_prefers_cudnn_on_hopper_only_with_new_cudnn(cudnn, backend) -> None:
    from finetune.kernels import ModelFacts
    from finetune.kernels.attention import sdpa_backend

    profile = _profile(_props(name="NVIDIA H100 80GB HBM3", major=9, minor=0), cudnn=cudnn)
    assert sdpa_backend(profile, ModelFacts(8, 4, 64, "bf16"), masked=False)[0] == backend
