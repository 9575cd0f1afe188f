"""LoRA family: how a LoRA linear layer computes its forward.

`fused` (finetune.kernels.lora_linear) adds the adapter's low-rank update inside the frozen
projection's output with one `addmm_`, instead of peft's separate scale and add over the output.
It is plain torch, so it runs on every device; measured on a 2-core CPU it made a LoRA training
step of a 30M Llama 1.08-1.18x faster (scripts/bench_layout.py). `peft` keeps peft's own
forward. Either way the parameters, the state dict and the saved adapter are peft's.
"""

from __future__ import annotations

from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support


def _fused(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, ("the low-rank update is accumulated into the projection's output (one addmm), "
                  "not scaled and added in separate passes")


def _peft(profile: HardwareProfile, facts: ModelFacts) -> Support:
    return True, "peft's own LoRA forward"


LORA: Registry[Candidate] = Registry(
    "lora",
    [Candidate("fused", _fused, default_rank=0), Candidate("peft", _peft, default_rank=1)],
)
