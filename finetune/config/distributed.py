"""Schema of the `distributed` config group: how a run spreads over its processes.

`finetune run R distributed=fsdp2` selects `configs/distributed/fsdp2.yaml`; `auto` (the
default) estimates the memory each device needs and picks the first strategy that fits
(`finetune.distributed.choose`). docs/distributed.md lists the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config.choice import Choice


class Strategy(Choice):
    """single: one process. ddp: every process holds the whole model (DistributedDataParallel).
    fsdp2: parameters, gradients and optimizer state sharded over the processes
    (torch.distributed.fsdp.fully_shard). deepspeed_zero2 / deepspeed_zero3: DeepSpeed's ZeRO
    stage 2 (gradients and optimizer state sharded) or 3 (parameters too), through
    accelerate's DeepSpeed integration."""

    auto = "auto"
    single = "single"
    ddp = "ddp"
    fsdp2 = "fsdp2"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"


class Offload(Choice):
    """CPU offload of sharded state: auto (on only when the estimate says the device is short
    of memory and the device shares its memory with the CPU), on, off."""

    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class DistributedConfig:
    """The strategy and its knobs.

    `cpu_offload`: fsdp2 keeps parameters, gradients and optimizer state in host memory
    (CPUOffloadPolicy); the DeepSpeed stages offload optimizer state. `reshard_after_forward`
    (fsdp2): free each layer's gathered parameters after its forward (least memory; false keeps
    them until the backward, like ZeRO-2). `reduce_dtype`: the dtype gradients are reduced in
    (auto: fp32). `timeout_s`: how long a collective may wait for a missing rank before the run
    fails (a crashed peer normally ends the job sooner: its launcher stops every rank).
    `deepspeed`: DeepSpeed config entries merged over the stage's defaults.
    """

    strategy: Strategy = Strategy.auto
    cpu_offload: Offload = Offload.auto
    reshard_after_forward: bool = True
    reduce_dtype: str = "auto"
    timeout_s: int = 600
    deepspeed: dict[str, Any] = field(default_factory=dict)
