"""Compile family: whether the model's decoder layers run under torch.compile.

Off by default everywhere for now: compiling a peft-wrapped model costs minutes of warm-up,
packed batches of varying length recompile, and the loop has not been validated under
Inductor. `kernels.compile=on` turns it on where Inductor works, one decoder layer at a time
(`compile_decoder_layers`), as torchtitan compiles its transformer blocks (pytorch/torchtitan,
`apply_compile`): the embeddings, the head and the loss stay eager, and FSDP2 shards each
compiled layer as its own unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.hardware.arch import AMD_COMPILE_BROKEN, is_amd
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support

if TYPE_CHECKING:
    import torch


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
    return True, "torch.compile per decoder layer (Inductor)"


COMPILE: Registry[Candidate] = Registry(
    "compile",
    [
        Candidate("off", _off, default_rank=0),
        Candidate("on", _on, default_rank=1, auto=False,
                  not_auto_reason="opt in with kernels.compile=on"),
    ],
)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer of `model` in place (`Module.compile`: parameter names and
    state_dict keys stay unchanged); the rest of the model stays eager. Returns how many layers
    were compiled; ConfigError when the model names none (transformers' `_no_split_modules`)."""
    from finetune.distributed.engine import decoder_layers
    from finetune.errors import ConfigError

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"kernels.compile=on: {type(model).__name__} names no decoder layer "
                         "(_no_split_modules), so there is nothing to compile one layer at a "
                         "time; set kernels.compile=off.")
    for layer in layers:
        layer.compile()
    return len(layers)
