"""`trainer.gradient_checkpointing=auto`: recompute the decoder layers' activations only when the
run would not fit without it.

Checkpointing trades about a third more compute for activations that shrink from every layer's
to one layer's input each. `choose_checkpointing` keeps it off while the memory estimate without
it (finetune.distributed.memory, made with the row length the data settled on and the strategy
the run chose) is within FIT_FRACTION of the memory one process may use, and turns it on
otherwise. On a GPU that budget is the device's memory (`device_budget`); on the CPU the run
lives in host memory shared with everything else on the machine, so it is the host memory
available now plus what this process already holds (which the estimate counts as overhead).
`true` and `false` are kept as configured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from finetune.config.distributed import DistributedConfig, Offload
from finetune.distributed.choose import (
    FIT_FRACTION,
    StrategyChoice,
    choose_strategy,
    device_budget,
)
from finetune.distributed.memory import format_bytes
from finetune.hardware.profile import HardwareProfile

AUTO = "auto"


@dataclass(frozen=True)
class Budget:
    """Bytes one process may use, and what they are in words ('the 79.1 GiB of NVIDIA H100')."""

    bytes: int | None
    source: str


@dataclass(frozen=True)
class CheckpointingChoice:
    """Whether the decoder layers recompute their activations in the backward, and why."""

    enabled: bool
    reason: str

    def headline(self) -> str:
        """'gradient checkpointing: off (auto: ...)': the line a run prints at start."""
        return f"gradient checkpointing: {'on' if self.enabled else 'off'} ({self.reason})"


def memory_budget(profile: HardwareProfile, local_processes: int = 1, *,
                  host_available: int | None = None, own_rss: int | None = None) -> Budget:
    """The memory one of `local_processes` processes on this machine may fill. A GPU: its
    memory split between the processes that share it. The CPU: the host memory available now
    (`host_available`, read with psutil when None) split between the processes, plus this
    process's resident memory (`own_rss`), since the estimate counts that as its overhead."""
    if profile.vendor != "cpu":
        budget = device_budget(profile, local_processes)
        if budget is None:
            return Budget(None, "the device's memory (unknown here)")
        return Budget(budget, f"the {format_bytes(budget)} of {profile.name}")
    if host_available is None or own_rss is None:
        import psutil

        host_available = psutil.virtual_memory().available if host_available is None \
            else host_available
        own_rss = psutil.Process().memory_info().rss if own_rss is None else own_rss
    available = host_available // max(local_processes, 1)
    return Budget(available + own_rss,
                  f"the {format_bytes(available)} of host memory available now plus the "
                  f"{format_bytes(own_rss)} this process holds")


def choose_checkpointing(setting: bool | str, strategy: StrategyChoice,
                         budget: Budget) -> CheckpointingChoice:
    """Gradient checkpointing for a run whose strategy is `strategy` (its workload and
    estimate made with the run's row length). `setting` is trainer.gradient_checkpointing:
    True or False are kept; `auto` is on only when the estimate without checkpointing is more
    than FIT_FRACTION of `budget`. With no workload or an unknown budget, auto stays off."""
    if setting is True or setting is False:
        return CheckpointingChoice(setting, f"trainer.gradient_checkpointing={str(setting).lower()}")
    if setting != AUTO:
        raise ValueError(f"gradient checkpointing setting {setting!r}: expected True, False "
                         f"or {AUTO!r}")
    workload = strategy.workload
    if workload is None or budget.bytes is None:
        return CheckpointingChoice(False, (
            "auto: the memory one process may use is unknown here, so it stays off; set "
            "trainer.gradient_checkpointing=true if the run runs out of memory"))
    world, offload = strategy.estimate.world_size, strategy.cpu_offload
    without = replace(workload, gradient_checkpointing=False).estimate(
        str(strategy.strategy), world, offload)
    limit = FIT_FRACTION * budget.bytes
    needs = (f"without it {strategy.strategy} needs about {format_bytes(without.total)} per "
             f"process for micro-batches of {without.micro_batch()}")
    share = f"{int(FIT_FRACTION * 100)}% of {budget.source}"
    if without.total <= limit:
        return CheckpointingChoice(False, f"auto: {needs}, within {share}")
    with_it = replace(workload, gradient_checkpointing=True).estimate(
        str(strategy.strategy), world, offload)
    still = "" if with_it.total <= limit else ", still more: see the distributed line"
    return CheckpointingChoice(True, (
        f"auto: {needs}, more than {share}; with it about {format_bytes(with_it.total)}"
        f"{still}"))


def with_checkpointing(setting: bool | str, strategy: StrategyChoice,
                       distributed: DistributedConfig, profile: HardwareProfile,
                       world_size: int, *, local_processes: int | None = None,
                       budget: Budget | None = None) -> tuple[CheckpointingChoice, StrategyChoice]:
    """(the checkpointing choice, `strategy`) for a run; when auto turns checkpointing on, the
    strategy's estimates are re-made with it and the strategy itself kept (its engine may be
    built already), as distributed=<strategy> would estimate it. `budget`: None reads
    `memory_budget` for this machine."""
    local = local_processes or world_size
    budget = budget if budget is not None else memory_budget(profile, local)
    choice = choose_checkpointing(setting, strategy, budget)
    if not choice.enabled or strategy.workload is None or strategy.workload.gradient_checkpointing:
        return choice, strategy
    workload = replace(strategy.workload, gradient_checkpointing=True)
    offload = Offload.on if strategy.cpu_offload else Offload.off
    kept = replace(distributed, strategy=strategy.strategy, cpu_offload=offload)
    again = choose_strategy(kept, workload, profile, world_size, local_processes=local)
    reason = again.reason
    if str(distributed.strategy) == "auto":  # chosen, not configured: say it as the choice did
        reason = reason.removeprefix("as configured: ").removeprefix("as configured, but ")
    return choice, replace(again, reason=f"{reason}; with gradient checkpointing")
