"""Schema of the `kernels` config group: which fused kernels a run may use."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config.choice import Choice


class FusedLinearCrossEntropy(Choice):
    """How the LM head and the loss run: auto (Liger's fused linear cross-entropy where it runs
    and passes its self-check, else the plain-torch chunked one), on (Liger's), chunked (the
    plain-torch chunked one), off (whole logits, then the loss)."""

    auto = "auto"
    on = "on"
    off = "off"
    chunked = "chunked"


class Autotune(Choice):
    """Time the candidates that pass their self-check and choose by measurement: auto tunes
    runs expected to last over 10x what tuning costs (and whenever the timings are cached)."""

    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class KernelsConfig:
    """Kernel choices; `auto` lets `finetune.kernels.plan` pick per detected vendor and arch.

    Any explicit value is honoured when the hardware supports it and is an error otherwise.
    The string fields are checked against the kernel registries (`finetune env` lists them),
    which are the one source of their allowed values.
    """

    attention: str = "auto"  # e.g. sdpa, flash_attention_2
    optimizer: str = "auto"  # e.g. adamw_fused, adamw_8bit
    fused_ops: str = "auto"  # e.g. liger
    lora: str = "auto"  # e.g. peft (peft's own LoRA forward instead of the fused one)
    compile: str = "auto"  # e.g. off (torch.compile)
    precision: str = "auto"  # e.g. bf16
    collective: str = "auto"  # e.g. nccl
    # The loss head: Liger's fused linear + cross-entropy when fused_ops is liger (auto: not
    # on gfx950), else the chunked plain-torch one; off materialises the logits.
    fused_linear_cross_entropy: FusedLinearCrossEntropy = FusedLinearCrossEntropy.auto
    selfcheck: bool = True  # run the numerical self-check of attention and optimizer
    # Time candidates at the run's shapes and take the fastest (finetune.kernels.autotune).
    autotune: Autotune = Autotune.auto
