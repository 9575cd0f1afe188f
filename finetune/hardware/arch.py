"""Architecture names and families, per vendor.

NVIDIA is keyed on its sm family and AMD on `gcnArchName`; the two are never compared (ROCm's
compute capabilities are synthetic: MI250 reports 9.0). Families are explicit sets, not `>=`
checks, because sm_120 is not a superset of sm_100 and gfx1100 is not "newer" than gfx942.
Sources: pytorch/pytorch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp (SDPA backends per
arch), ROCm/aotriton v2src/util.cc (AOTriton targets), Dao-AILab/flash-attention setup.py (CK
targets), vllm-project/vllm#40620 (sm_120 is not a superset of sm_100).
"""

from __future__ import annotations

from finetune.hardware.profile import HardwareProfile

# AMD: Instinct (CDNA) and Radeon (RDNA) parts by gfx target.
AMD_CDNA: frozenset[str] = frozenset({"gfx90a", "gfx940", "gfx941", "gfx942", "gfx950"})
AMD_RDNA: frozenset[str] = frozenset(
    {"gfx1100", "gfx1101", "gfx1102", "gfx1103", "gfx1150", "gfx1151", "gfx1152", "gfx1153",
     "gfx1200", "gfx1201"}
)
# Native bf16 (and a working Triton/Inductor) from gfx90a on; older parts (gfx906, gfx908,
# RDNA2 gfx103x) are left out.
AMD_BF16_NATIVE: frozenset[str] = AMD_CDNA | AMD_RDNA
# hipBLASLt honours HIPBLASLT_ALLOW_TF32 on MI300 (gfx94x). Not on gfx950 (MI350X/MI355X): it
# has no TF32 hardware, hipBLASLt emulates TF32 with bf16 there, and that path has an open
# wrong-result report (ROCm/hipBLASLt#1806, ROCm/rocm-libraries#12226).
AMD_HIPBLASLT_TF32: frozenset[str] = frozenset({"gfx940", "gfx941", "gfx942"})
AMD_TF32_EMULATED: frozenset[str] = frozenset({"gfx950"})
# flash-attn's CK backend (setup.py allow-list).
AMD_FLASH_ATTN_CK: frozenset[str] = frozenset(
    {"gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1102", "gfx1150", "gfx1151",
     "gfx1200", "gfx1201"}
)
# AOTriton (torch's SDPA flash/efficient backends on ROCm), ROCm/aotriton v2src/util.cc.
AMD_AOTRITON: frozenset[str] = frozenset(
    {"gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1151", "gfx1201"}
)
# Archs some AOTriton version treats as experimental: torch refuses AOTriton there unless
# TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1 and SDPA silently falls through to MATH (quadratic
# memory). The set differs between AOTriton versions (torch 2.5 treated gfx1100 as
# experimental), which is why the plan sets the flag on every AMD GPU.
AMD_AOTRITON_EXPERIMENTAL: frozenset[str] = frozenset(
    {"gfx950", "gfx1100", "gfx1151", "gfx1201"}
)
# Inductor miscompiles here (unsloth disables torch.compile on gfx906).
AMD_COMPILE_BROKEN: frozenset[str] = frozenset({"gfx906"})

# NVIDIA families by compute-capability major.
NVIDIA_FAMILY_BY_MAJOR: dict[int, str] = {
    7: "volta_turing",
    8: "ampere_ada",
    9: "hopper",
    10: "blackwell",
    11: "blackwell",
    12: "blackwell_rtx",
}
# Ampere and newer: native bf16, TF32, flash-attn 2, SDPA flash.
NVIDIA_SM80_PLUS: frozenset[str] = frozenset({"ampere_ada", "hopper", "blackwell", "blackwell_rtx"})

# Rank families: candidates rank per family, lower is preferred. Datacenter Blackwell (sm_100,
# sm_103) and Blackwell workstation/consumer parts (sm_120, sm_121) rank attention differently,
# so they are families of their own; other sm80+ parts (Ampere, Ada, sm_110) share nvidia_sm80.
NVIDIA_SM100: frozenset[str] = frozenset({"sm_100", "sm_103"})
NVIDIA_SM120: frozenset[str] = frozenset({"sm_120", "sm_121"})
RANK_FAMILIES: tuple[str, ...] = (
    "nvidia_hopper",
    "nvidia_sm100",
    "nvidia_sm120",
    "nvidia_sm80",
    "nvidia_legacy",
    "amd_cdna",
    "amd_rdna",
    "amd_legacy",
    "intel",
    "apple",
    "cpu",
)


def nvidia_arch(major: int, minor: int) -> str:
    """`sm_XY` from a real NVIDIA compute capability."""
    return f"sm_{major}{minor}"


def amd_arch(gcn_arch_name: str) -> str:
    """The gfx target from ROCm's `gcnArchName` ("gfx90a:sramecc+:xnack-" -> "gfx90a")."""
    return gcn_arch_name.split(":")[0].strip()


def nvidia_family(profile: HardwareProfile) -> str | None:
    """volta_turing | ampere_ada | hopper | blackwell | blackwell_rtx; None off NVIDIA or unknown."""
    if profile.vendor != "nvidia" or profile.compute_capability is None:
        return None
    return NVIDIA_FAMILY_BY_MAJOR.get(profile.compute_capability[0])


def is_nvidia_sm80_plus(profile: HardwareProfile) -> bool:
    """NVIDIA Ampere or newer (native bf16, TF32, flash kernels)."""
    return nvidia_family(profile) in NVIDIA_SM80_PLUS


def is_amd(profile: HardwareProfile, archs: frozenset[str]) -> bool:
    """True on AMD when the gfx target is in `archs`."""
    return profile.vendor == "amd" and profile.arch in archs


def rank_family(profile: HardwareProfile) -> str:
    """The family candidate ranks are keyed on (one of RANK_FAMILIES)."""
    if profile.vendor == "nvidia":
        family = nvidia_family(profile)
        if family == "hopper":
            return "nvidia_hopper"
        if profile.arch in NVIDIA_SM100:
            return "nvidia_sm100"
        if profile.arch in NVIDIA_SM120:
            return "nvidia_sm120"
        if family in NVIDIA_SM80_PLUS:
            return "nvidia_sm80"
        return "nvidia_legacy"
    if profile.vendor == "amd":
        if profile.arch in AMD_CDNA:
            return "amd_cdna"
        if profile.arch in AMD_RDNA:
            return "amd_rdna"
        return "amd_legacy"
    return {"intel": "intel", "apple": "apple"}.get(profile.vendor, "cpu")


def device_type(profile: HardwareProfile) -> str:
    """The torch device type kernels run on: cuda (NVIDIA and ROCm), xpu, mps or cpu."""
    return {"nvidia": "cuda", "amd": "cuda", "intel": "xpu", "apple": "mps"}.get(
        profile.vendor, "cpu"
    )
