"""Compile family: whether the model is wrapped in torch.compile.

Off by default everywhere for now: compiling a peft-wrapped model costs minutes of warm-up,
packed batches of varying length recompile, and the loop has not been validated under
Inductor. `kernels.compile=on` turns it on where Inductor works.
"""

from __future__ import annotations

from finetune.hardware.arch import AMD_COMPILE_BROKEN, is_amd
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support


def _off(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if is_amd(profile, AMD_COMPILE_BROKEN):
        return True, f"Inductor miscompiles on {profile.arch} (unsloth disables it there too)"
    if profile.vendor == "cpu":
        return True, "Inductor's C++ compile time outweighs the gain on short CPU runs"
    if profile.vendor == "apple":
        return True, "Inductor's MPS backend is experimental"
    return True, (
        "not on by default: compiling the peft model adds minutes of warm-up and packed "
        "batches recompile; try kernels.compile=on"
    )


def _on(profile: HardwareProfile, facts: ModelFacts) -> Support:
    if is_amd(profile, AMD_COMPILE_BROKEN):
        return False, f"is unsafe on {profile.arch}: Inductor miscompiles there"
    if profile.vendor in ("nvidia", "amd", "intel") and not profile.has_package("triton"):
        return False, "needs triton (Inductor generates Triton kernels on GPUs)"
    return True, "torch.compile (Inductor)"


COMPILE: Registry[Candidate] = Registry(
    "compile",
    [
        Candidate("off", _off, default_rank=0),
        Candidate("on", _on, default_rank=1, auto=False,
                  not_auto_reason="opt in with kernels.compile=on"),
    ],
)
