"""Build a `HardwareProfile` from this machine, or from injected device properties.

`detect()` reads torch; the `profile_from_*` builders take plain facts, so a test (or a named
simulated profile) can describe any GPU on a CPU-only machine and get exactly the profile
detection would produce there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform
import re
from dataclasses import replace
from pathlib import Path

from finetune.hardware.arch import amd_arch, nvidia_arch
from finetune.hardware.peak import peak_bf16_tflops
from finetune.hardware.profile import PACKAGE_DISTRIBUTIONS, DeviceProperties, HardwareProfile

logger = logging.getLogger(__name__)

GIB = 2**30
# CPU flags that mean native bf16 arithmetic (Sapphire Rapids AMX, Cooper Lake / Zen 4 AVX512).
CPU_BF16_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16"})
CPU_AMX_FLAG = "amx_bf16"
# MI300A (APU) and MI300X are both gfx942; only the CU count tells them apart.
MI300A_COMPUTE_UNITS = 228
# Strix Point / Strix Halo APUs.
AMD_APU_ARCHS: frozenset[str] = frozenset({"gfx1150", "gfx1151", "gfx1152", "gfx1153"})


def distribution_version(name: str) -> str | None:
    """The installed version of distribution `name` ("flash-attn-4"), None when not installed.

    Reads package metadata only; nothing is imported. A broken install counts as absent.
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a damaged dist-info must not stop detection
        logger.debug("reading the metadata of %r failed; treating it as not installed", name)
        return None


def installed_packages() -> frozenset[str]:
    """Optional kernel packages (OPTIONAL_PACKAGES names) installed here, by distribution."""
    return frozenset(
        name for name, dists in PACKAGE_DISTRIBUTIONS.items()
        if any(distribution_version(d) is not None for d in dists)
    )


def flash_attn_build() -> str | None:
    """"compiled" when the installed flash-attn carries its `flash_attn_2_cuda` extension (CUDA,
    or the CK backend on ROCm), "triton" when it does not (a ROCm build made with
    FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE runs its Triton backend only), None when flash-attn
    is not installed. Decided from the distribution's file list, then from a module lookup
    (editable installs may not list the extension); nothing is imported.
    """
    try:
        files = importlib.metadata.distribution("flash-attn").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:
        logger.debug("reading flash-attn's file list failed")
        files = []
    if any(Path(str(f)).name.startswith("flash_attn_2_cuda") for f in files):
        return "compiled"
    try:
        found = importlib.util.find_spec("flash_attn_2_cuda") is not None
    except (ImportError, ValueError):
        found = False
    return "compiled" if found else "triton"


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo; empty where that file does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str]) -> bool:
    """True when the CPU flags include AMX-BF16 or AVX512-BF16."""
    return bool(flags & CPU_BF16_FLAGS)


def cpu_has_amx(flags: frozenset[str]) -> bool:
    """True when the CPU flags include AMX-BF16 (matrix tiles, not only AVX512 dot products)."""
    return CPU_AMX_FLAG in flags


def _gib(num_bytes: int) -> float:
    return round(num_bytes / GIB, 1)


def _apu_memory(props: DeviceProperties, device_count: int,
                host_memory_bytes: int | None) -> int:
    # An APU's total_memory may be only the BIOS carve-out (vllm-project/vllm#50320), so host
    # RAM is used when larger. But the OS of a node with several APUs sees all of them as one
    # host RAM (a 4 x MI300A node: 4 x 128 GB HBM3, AMD Instinct MI300A data sheet), so each
    # device gets its share, never the whole node's.
    if not host_memory_bytes:
        return props.total_memory
    return max(props.total_memory, host_memory_bytes // max(device_count, 1))


def _is_unified(vendor: str, arch: str, props: DeviceProperties) -> bool:
    if props.is_integrated:
        return True
    if vendor == "amd":
        return (arch == "gfx942" and props.multi_processor_count == MI300A_COMPUTE_UNITS) or (
            arch in AMD_APU_ARCHS
        )
    # GH200/GB200 are coherent over NVLink-C2C but are not known to set is_integrated; GB10
    # (sm_121, DGX Spark) shares LPDDR5x with its Grace CPU.
    tokens = set(re.split(r"[^0-9A-Za-z]+", props.name.upper()))
    return props.machine == "aarch64" and (
        bool(tokens & {"GH200", "GB200", "GB10"}) or (props.major, props.minor) == (12, 1)
    )


def profile_from_device_properties(
    props: DeviceProperties,
    *,
    device_count: int,
    runtime_version: str,
    torch_version: str,
    packages: frozenset[str] = frozenset(),
    cpu_bf16: bool = False,
    host_memory_bytes: int | None = None,
    cudnn: str | None = None,
    simulated: bool = True,
    profile_name: str | None = None,
) -> HardwareProfile:
    """The profile of a CUDA or ROCm machine whose device 0 reports `props`.

    The vendor comes from `props.is_hip` (torch.version.hip), never from the name. On ROCm the
    arch is the gfx target and the synthetic major/minor are dropped; on CUDA `gcn_arch_name`
    (an alias of the name there) is ignored. On AMD APUs `total_memory` may be only the BIOS
    carve-out, so the larger of it and this device's share of host RAM (host RAM divided by
    `device_count`) is used.
    """
    if props.is_hip:
        vendor = "amd"
        arch = amd_arch(props.gcn_arch_name) or "gfx_unknown"
        compute_capability = None
        runtime = f"rocm {runtime_version}"
    else:
        vendor = "nvidia"
        arch = nvidia_arch(props.major, props.minor)
        compute_capability = (props.major, props.minor)
        runtime = f"cuda {runtime_version}"
    unified = _is_unified(vendor, arch, props)
    memory = props.total_memory
    if unified and vendor == "amd":
        memory = _apu_memory(props, device_count, host_memory_bytes)
    return HardwareProfile(
        vendor=vendor,
        arch=arch,
        name=props.name,
        device_count=device_count,
        memory_gb=_gib(memory),
        unified_memory=unified,
        peak_bf16_tflops=peak_bf16_tflops(vendor, arch, props.name, props.multi_processor_count),
        runtime=runtime,
        torch=torch_version,
        compute_capability=compute_capability,
        compute_units=props.multi_processor_count,
        cpu_bf16=cpu_bf16,
        machine=props.machine,
        cudnn=cudnn if vendor == "nvidia" else None,
        packages=packages,
        simulated=simulated,
        profile_name=profile_name,
    )


def profile_from_xpu_properties(
    *,
    name: str,
    total_memory: int,
    max_compute_units: int,
    device_count: int,
    torch_version: str,
    packages: frozenset[str] = frozenset(),
    cpu_bf16: bool = False,
    machine: str = "x86_64",
    simulated: bool = True,
    profile_name: str | None = None,
) -> HardwareProfile:
    """The profile of an Intel XPU machine (what torch.xpu.get_device_properties reports)."""
    return HardwareProfile(
        vendor="intel",
        arch="xpu",
        name=name,
        device_count=device_count,
        memory_gb=_gib(total_memory),
        unified_memory=False,
        peak_bf16_tflops=peak_bf16_tflops("intel", "xpu", name, max_compute_units),
        runtime="xpu",
        torch=torch_version,
        compute_units=max_compute_units,
        cpu_bf16=cpu_bf16,
        machine=machine,
        packages=packages,
        simulated=simulated,
        profile_name=profile_name,
    )


def profile_from_mps(
    *,
    name: str,
    recommended_max_memory: int,
    macos: str,
    torch_version: str,
    packages: frozenset[str] = frozenset(),
    simulated: bool = True,
    profile_name: str | None = None,
) -> HardwareProfile:
    """The profile of an Apple-silicon machine running on MPS."""
    return HardwareProfile(
        vendor="apple",
        arch="mps",
        name=name,
        device_count=1,
        memory_gb=_gib(recommended_max_memory),
        unified_memory=True,
        peak_bf16_tflops=None,
        runtime="mps",
        torch=torch_version,
        machine="arm64",
        macos=macos,
        packages=packages,
        simulated=simulated,
        profile_name=profile_name,
    )


def profile_from_cpu(
    *,
    name: str,
    host_memory_bytes: int,
    cpu_bf16: bool,
    torch_version: str,
    cpu_amx: bool = False,
    machine: str = "x86_64",
    packages: frozenset[str] = frozenset(),
    simulated: bool = True,
    profile_name: str | None = None,
) -> HardwareProfile:
    """The profile of a machine with no accelerator."""
    return HardwareProfile(
        vendor="cpu",
        arch="cpu",
        name=name,
        device_count=1,
        memory_gb=_gib(host_memory_bytes),
        unified_memory=False,
        peak_bf16_tflops=None,
        runtime="cpu",
        torch=torch_version,
        cpu_bf16=cpu_bf16,
        cpu_amx=cpu_amx,
        machine=machine,
        packages=packages,
        simulated=simulated,
        profile_name=profile_name,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def _host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _short_version(version: str) -> str:
    """"6.4.43482-0f2d60242" -> "6.4"."""
    return ".".join(re.split(r"[.\-+]", version)[:2])


def _cudnn_version() -> str | None:
    import torch

    raw = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not raw:
        return None
    return cudnn_version_string(raw)


def cudnn_version_string(raw: int) -> str:
    """torch.backends.cudnn.version() -> "major.minor.patch".

    cuDNN 9+ encodes major*10000 + minor*100 + patch (91002 -> 9.10.2); cuDNN 8 used
    major*1000 + minor*100 + patch (8902 -> 8.9.2).
    """
    if raw >= 10000:
        return f"{raw // 10000}.{raw % 10000 // 100}.{raw % 100}"
    return f"{raw // 1000}.{raw % 1000 // 100}.{raw % 100}"


def detect() -> HardwareProfile:
    """Describe this machine: the first accelerator torch sees (CUDA/ROCm, XPU, MPS) or the CPU.

    Cheap: no kernels run and no optional package is imported (packages are found by their
    distribution metadata). The profile is not simulated,
    so the kernel planner self-checks its choices on it.
    """
    import torch

    torch_version = _torch_version()
    packages = installed_packages()
    cpu_flags = read_cpu_flags()
    cpu_bf16 = cpu_has_native_bf16(cpu_flags)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        is_hip = torch.version.hip is not None
        props = DeviceProperties(
            is_hip=is_hip,
            name=p.name,
            gcn_arch_name=getattr(p, "gcnArchName", "") if is_hip else "",
            major=p.major,
            minor=p.minor,
            total_memory=p.total_memory,
            multi_processor_count=p.multi_processor_count,
            is_integrated=bool(getattr(p, "is_integrated", False)),
            machine=platform.machine(),
        )
        runtime_version = torch.version.hip if is_hip else torch.version.cuda
        profile = profile_from_device_properties(
            props,
            device_count=torch.cuda.device_count(),
            runtime_version=_short_version(runtime_version or "unknown"),
            torch_version=torch_version,
            packages=packages,
            cpu_bf16=cpu_bf16,
            host_memory_bytes=_host_memory_bytes(),
            cudnn=None if is_hip else _cudnn_version(),
            simulated=False,
        )
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        p = torch.xpu.get_device_properties(0)
        profile = profile_from_xpu_properties(
            name=p.name,
            total_memory=p.total_memory,
            max_compute_units=p.max_compute_units,
            device_count=torch.xpu.device_count(),
            torch_version=torch_version,
            packages=packages,
            cpu_bf16=cpu_bf16,
            machine=platform.machine(),
            simulated=False,
        )
    elif torch.backends.mps.is_available() and torch.backends.mps.is_built():
        profile = profile_from_mps(
            name="Apple silicon (MPS)",
            recommended_max_memory=int(torch.mps.recommended_max_memory()),
            macos=platform.mac_ver()[0] or "unknown",
            torch_version=torch_version,
            packages=packages,
            simulated=False,
        )
    else:
        profile = profile_from_cpu(
            name=_cpu_name(),
            host_memory_bytes=_host_memory_bytes(),
            cpu_bf16=cpu_bf16,
            cpu_amx=cpu_has_amx(cpu_flags),
            torch_version=torch_version,
            machine=platform.machine(),
            packages=packages,
            simulated=False,
        )
    profile = replace(profile, flash_attn_build=flash_attn_build(),
                      transformers=distribution_version("transformers"))
    logger.debug("detected hardware: %s", profile)
    return profile
