"""Schema of the `kernels` config group: which fused kernels a run may use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KernelsConfig:
    """Kernel choices; `auto` lets `finetune.kernels.plan` pick per detected vendor and arch.

    Any explicit value is honoured when the hardware supports it and is an error otherwise.
    """

    attention: str = "auto"  # auto | flash_attention_3 | flash_attention_2 | sdpa | flex_attention | eager
    optimizer: str = "auto"  # auto | adamw_fused | adamw_foreach | adamw | adamw_8bit | paged_adamw_8bit
    fused_ops: str = "auto"  # auto | liger | none
    compile: str = "auto"  # auto | on | off
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    collective: str = "auto"  # auto | nccl | xccl | gloo
    fused_linear_cross_entropy: str = "auto"  # auto | on | off (Liger FLCE; auto: off on gfx950)
    selfcheck: bool = True  # run the numerical self-check of attention and optimizer
