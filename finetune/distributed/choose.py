"""`distributed.strategy=auto`: the strategy and cpu offload a run gets, chosen by memory.

`config_for_estimate` finds the model's config (offline for the shipped models),
`workload_from_run` turns a run's config and kernel plan into the estimate's inputs, and
`choose_strategy` compares the per-device estimates of `finetune.distributed.memory` with the
device's memory and returns a concrete `StrategyChoice` with a reason that carries the
numbers. An explicit strategy is kept (a wrong process count is an error; not fitting is only
said in the reason). With data.max_seq_len=auto the row length is known only once the data is
read: `with_data_length` then re-makes the estimates with it, for what the run prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune.config.distributed import DistributedConfig, Offload, Strategy
from finetune.config.schema import ModelConfig, RunConfig
from finetune.distributed.memory import (
    AUTO_SEQ_LEN,
    GIB,
    SHARDED,
    MemoryEstimate,
    Workload,
    format_bytes,
    model_shape,
    runtime_overhead,
)
from finetune.errors import ConfigError
from finetune.hardware.profile import HardwareProfile
from finetune.kernels.kernel_plan import KernelPlan

# Share of a device's memory the estimate may fill: the rest absorbs allocator fragmentation
# and what the estimate leaves out (masks, communication buckets, temporary buffers).
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class StrategyChoice:
    """A concrete strategy (never auto), whether to offload to host memory, and why.

    `estimates` holds every estimate considered, keyed by `label(strategy, offload)`;
    `fits` is None when the device's memory is unknown; `workload` is what was estimated.
    """

    strategy: Strategy
    cpu_offload: bool
    reason: str
    estimates: dict[str, MemoryEstimate]
    fits: bool | None
    workload: Workload | None = None

    @property
    def estimate(self) -> MemoryEstimate:
        """The estimate of the chosen strategy."""
        return self.estimates[label(self.strategy, self.cpu_offload)]

    def headline(self) -> str:
        """'distributed: fsdp2 (reason); estimated for micro-batches of 1 x 2048 tokens': the
        line a run prints at start."""
        offload = " + cpu offload" if self.cpu_offload else ""
        return (f"distributed: {self.strategy}{offload} ({self.reason}); estimated for "
                f"micro-batches of {self.estimate.micro_batch()}")

    def describe(self) -> str:
        """The headline and the chosen estimate's lines."""
        return f"{self.headline()}\n{self.estimate.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the `memory` block of `finetune env --json`)."""
        return {"strategy": str(self.strategy), "cpu_offload": self.cpu_offload,
                "reason": self.reason, "fits": self.fits, "estimate": self.estimate.to_dict(),
                "considered": {k: v.to_dict() for k, v in self.estimates.items()}}


def label(strategy: str, cpu_offload: bool) -> str:
    """The key of an estimate in `StrategyChoice.estimates`: 'fsdp2' or 'fsdp2+cpu_offload'."""
    return f"{strategy}+cpu_offload" if cpu_offload else str(strategy)


def device_budget(profile: HardwareProfile, local_processes: int) -> int | None:
    """Bytes of device memory one process may use: the device's, split between the processes
    that share it (CPU runs share host memory); None when unknown."""
    if profile.memory_gb is None:
        return None
    sharing = math.ceil(local_processes / max(profile.device_count, 1))
    return int(profile.memory_gb * GIB / max(sharing, 1))


def choose_strategy(distributed: DistributedConfig, workload: Workload,
                    profile: HardwareProfile, world_size: int, *,
                    local_processes: int | None = None) -> StrategyChoice:
    """The strategy for `world_size` processes (`local_processes` of them on this machine,
    default all) on `profile`'s devices.

    An explicit strategy is kept. `single` needs one process and `ddp` two or more (with one
    process it would be single without saying so); fsdp2 and the DeepSpeed stages also run on
    one process, where they shard nothing but can offload to host memory (ZeRO-Offload,
    FSDP2's CPUOffloadPolicy). `auto`: one process gets `single`, several get `ddp` when its
    estimate fits FIT_FRACTION of the device, else `fsdp2`; when fsdp2 does not fit either,
    fsdp2 offloads to host memory if the device shares it with the host (MI300A, GH200:
    offloading costs little there). `cpu_offload=on` always offloads (auto then picks fsdp2,
    the strategy that offloads most), `off` never; `auto` offloads only as just said, for any
    sharded strategy.

    Raises:
        ConfigError: the strategy cannot run on `world_size` processes, or cpu_offload=on
            with single or ddp.
    """
    strategy, offload = Strategy(distributed.strategy), Offload(distributed.cpu_offload)
    _check(strategy, offload, world_size)
    budget = device_budget(profile, local_processes or world_size)
    chooser = _Chooser(workload, profile, world_size, budget)
    if strategy != Strategy.auto:
        return chooser.explicit(strategy, offload)
    return chooser.auto(offload)


def _check(strategy: Strategy, offload: Offload, world_size: int) -> None:
    if strategy == Strategy.single and world_size > 1:
        raise ConfigError(
            f"distributed=single runs one process, but {world_size} were started. Start one "
            "(--nproc 1), or choose distributed=auto, ddp or fsdp2 for several.")
    if strategy == Strategy.ddp and world_size == 1:
        raise ConfigError(
            "distributed=ddp needs two or more processes (with one it is distributed=single). "
            "Start several with --nproc N, or choose distributed=single or auto.")
    if offload == Offload.on and strategy in (Strategy.single, Strategy.ddp):
        raise ConfigError(
            f"distributed.cpu_offload=on: {strategy} keeps everything on the device and cannot "
            "offload. Choose distributed=fsdp2 (or deepspeed_zero2/zero3, or auto), or set "
            "distributed.cpu_offload=auto.")


class _Chooser:
    """The estimates and sentences of one choice."""

    def __init__(self, workload: Workload, profile: HardwareProfile, world_size: int,
                 budget: int | None) -> None:
        self.workload, self.profile, self.world = workload, profile, world_size
        self.budget = budget
        self.estimates: dict[str, MemoryEstimate] = {}

    def estimate(self, strategy: str, offload: bool = False) -> MemoryEstimate:
        key = label(strategy, offload)
        if key not in self.estimates:
            self.estimates[key] = self.workload.estimate(strategy, self.world, offload)
        return self.estimates[key]

    def fits(self, estimate: MemoryEstimate) -> bool:
        return self.budget is None or estimate.total <= FIT_FRACTION * self.budget

    def done(self, strategy: Strategy, offload: bool, reason: str) -> StrategyChoice:
        estimate = self.estimate(strategy, offload)
        fits = None if self.budget is None else self.fits(estimate)
        return StrategyChoice(strategy, offload, reason, dict(self.estimates), fits,
                              self.workload)

    # ------------------------------------------------------------------ sentences

    def needs(self, strategy: str, offload: bool = False) -> str:
        """'fsdp2 over 8 processes needs about 24.1 GiB per device (+3.0 GiB of host memory)'."""
        est = self.estimate(strategy, offload)
        over = f" over {self.world} processes" if self.world > 1 else ""
        host = f" (+{format_bytes(est.host)} of host memory)" if est.host else ""
        mode = f"{strategy} with cpu offload" if offload else str(strategy)
        return f"{mode}{over} needs about {format_bytes(est.total)} per device{host}"

    def device(self) -> str:
        """'the 79.1 GiB of an NVIDIA H100 80GB HBM3 (90% usable)'."""
        if self.budget is None:
            return "the device's memory (unknown here)"
        shared = self.budget < (self.profile.memory_gb or 0) * GIB - 1
        budget, name = format_bytes(self.budget), self.profile.name
        what = (f"{budget} of {name}'s memory per process (shared by the processes on it)"
                if shared else f"the {budget} of {name}")
        return f"{int(FIT_FRACTION * 100)}% of {what}"

    def verdict(self, strategy: str, offload: bool = False) -> str:
        est = self.estimate(strategy, offload)
        word = "within" if self.fits(est) else "more than"
        return f"{self.needs(strategy, offload)}, {word} {self.device()}"

    def what_to_try(self, strategy: str, offload: bool) -> str:
        """Changes that lower the estimate, each with its figure."""
        w, tries = self.workload, []

        def figure(text: str, changed: Workload, strat: str = strategy,
                   off: bool = offload) -> None:
            total = changed.estimate(strat, self.world, off).total
            tries.append(f"{text} (about {format_bytes(total)})")

        if not w.gradient_checkpointing:
            figure("trainer.gradient_checkpointing=true", replace(w, gradient_checkpointing=True))
        if w.micro_batch_size > 1:
            figure("trainer.micro_batch_size=1 with more trainer.grad_accum_steps",
                   replace(w, micro_batch_size=1))
        if w.full:
            figure("peft=lora", replace(w, peft_method="lora"))
        elif w.peft_method != "qlora":
            figure("peft=qlora", replace(w, peft_method="qlora"))
        if strategy not in SHARDED and self.world > 1:
            figure("distributed=fsdp2", w, strat="fsdp2")
        elif not offload:
            figure("distributed.cpu_offload=on", w, strat=strategy if strategy in SHARDED
                   else "fsdp2", off=True)
        tries.append("more processes (--nproc N, or more nodes)")
        return "; ".join(tries)

    # ------------------------------------------------------------------ choices

    def explicit(self, strategy: Strategy, offload: Offload) -> StrategyChoice:
        sharded = strategy in SHARDED
        use_offload = offload == Offload.on
        if (sharded and offload == Offload.auto and self.profile.unified_memory
                and not self.fits(self.estimate(strategy))):
            use_offload = True
        note = ("; over one process nothing is sharded (useful with cpu offload)"
                if sharded and self.world == 1 and not use_offload else "")
        if self.budget is None:
            return self.done(strategy, use_offload, (
                f"as configured; {self.needs(strategy, use_offload)}; the device's memory is "
                f"unknown here, so whether it fits is not checked{note}"))
        verdict = self.verdict(strategy, use_offload)
        if use_offload and offload == Offload.auto:
            verdict += f" ({self.profile.name} shares its memory with the host: offload is cheap)"
        if self.fits(self.estimate(strategy, use_offload)):
            return self.done(strategy, use_offload, f"as configured: {verdict}{note}")
        return self.done(strategy, use_offload, (
            f"as configured, but {verdict}: it may run out of memory; try "
            f"{self.what_to_try(strategy, use_offload)}{note}"))

    def auto(self, offload: Offload) -> StrategyChoice:
        summary = self.workload.summary()
        if offload == Offload.on:
            return self.done(Strategy.fsdp2, True, (
                f"distributed.cpu_offload=on asks for host memory, and fsdp2 offloads "
                f"parameters, gradients and optimizer state: {summary}: "
                f"{self.verdict('fsdp2', True)}"))
        first = Strategy.single if self.world == 1 else Strategy.ddp
        if self.budget is None:
            return self.done(first, False, (
                f"{summary}: {self.needs(first)}; the device's memory is unknown here, so "
                f"{first} is assumed to fit"))
        if self.fits(self.estimate(first)):
            return self.done(first, False, f"{summary}: {self.verdict(first)}")
        reason = f"{summary}: {self.verdict(first)}"
        if self.world > 1:
            if self.fits(self.estimate("fsdp2")):
                return self.done(Strategy.fsdp2, False, f"{reason}; {self.needs('fsdp2')}")
            reason += f", and {self.verdict('fsdp2')}"
        if self.profile.unified_memory and offload == Offload.auto:
            reason += (f"; {self.profile.name} shares its memory with the host, so offloading "
                       f"costs little: {self.needs('fsdp2', True)}")
            if not self.fits(self.estimate("fsdp2", True)):
                reason += f": it will not fit either; try {self.what_to_try('fsdp2', True)}"
            return self.done(Strategy.fsdp2, True, reason)
        fallback = Strategy.fsdp2 if self.world > 1 else Strategy.single
        return self.done(fallback, False, (
            f"{reason}: it will not fit; try {self.what_to_try(fallback, False)}"))


def workload_from_run(cfg: RunConfig, hf_config: Any, kernel_plan: KernelPlan, *,
                      pairs: bool = False, seq_len: int | None = None) -> Workload:
    """The workload of a run: its config, the model's config and the kernel plan's dtypes,
    optimizer, attention and fused ops; the overhead of the plan's device (`runtime_overhead`:
    on the CPU this process's memory now, so call it before the model loads).

    `pairs`: the recipe trains on preference pairs (two sequences a micro-batch row), and a
    full fine-tune then keeps a frozen reference model unless dpo.precompute_ref (recipes/dpo).
    `seq_len`: the row length the data settled on; None takes data.max_seq_len, or for `auto`
    AUTO_SEQ_LEN capped by the model's context (said in `seq_len_from`).
    """
    shape = model_shape(hf_config)
    if seq_len is not None:
        length, source = seq_len, "data"
    elif isinstance(cfg.data.max_seq_len, int):
        length, source = cfg.data.max_seq_len, "data.max_seq_len"
    else:
        length = min(AUTO_SEQ_LEN, shape.context or AUTO_SEQ_LEN)
        source = (f"data.max_seq_len=auto, assumed {length} until the data decides; set "
                  "data.max_seq_len=N for an exact figure")
    full = str(cfg.peft.method) == "none"
    overhead, overhead_from = runtime_overhead(kernel_plan.hardware.vendor)
    return Workload(
        shape=shape, peft_method=str(cfg.peft.method), lora_r=cfg.peft.r,
        target_modules=cfg.peft.target_modules, peft_bias=str(cfg.peft.bias),
        micro_batch_size=cfg.trainer.micro_batch_size, pairs=pairs, seq_len=length,
        # auto is decided once the data is read (finetune.distributed.checkpointing): until
        # then the estimate is made without it
        gradient_checkpointing=cfg.trainer.gradient_checkpointing is True,
        base_dtype=kernel_plan.base_dtype, trainable_dtype=kernel_plan.trainable_dtype,
        compute_dtype=kernel_plan.compute_dtype, optimizer=kernel_plan.optimizer,
        fused_linear_cross_entropy="fused_linear_cross_entropy" in kernel_plan.fused_ops,
        chunked_loss=kernel_plan.loss_head == "chunked",
        eager_attention=kernel_plan.attn_implementation == "eager",
        reference_model=pairs and full and not cfg.dpo.precompute_ref,
        reshard_after_forward=cfg.distributed.reshard_after_forward, seq_len_from=source,
        overhead=overhead, overhead_from=overhead_from)


def with_data_length(choice: StrategyChoice, distributed: DistributedConfig,
                     profile: HardwareProfile, world_size: int, *, seq_len: int,
                     seq_len_from: str, mean_row_tokens: float | None = None,
                     local_processes: int | None = None) -> StrategyChoice:
    """`choice`, made before the data was read, with its estimates re-made for the row length
    the data settled on (`seq_len`, decided as `seq_len_from` says) and, for padding-free
    rows, the data's mean row length (`Workload.mean_row_tokens`); everything else, the
    overhead included, as `choice` estimated it.

    The run keeps the strategy it started with: when `distributed=auto` would choose another
    one at this length, the reason says so and names the setting for the next run.
    """
    if choice.workload is None:
        return choice
    workload = replace(choice.workload, seq_len=seq_len, seq_len_from=seq_len_from,
                       mean_row_tokens=mean_row_tokens)
    if workload.tokens == choice.workload.tokens and seq_len == choice.workload.seq_len:
        return choice
    again = choose_strategy(distributed, workload, profile, world_size,
                            local_processes=local_processes)
    if (again.strategy, again.cpu_offload) == (choice.strategy, choice.cpu_offload):
        return again
    offload = Offload.on if choice.cpu_offload else Offload.off
    kept = choose_strategy(replace(distributed, strategy=choice.strategy, cpu_offload=offload),
                           workload, profile, world_size, local_processes=local_processes)
    now = label(again.strategy, again.cpu_offload).replace("+cpu_offload", " with cpu offload")
    return replace(kept, reason=(
        f"chosen for rows of up to {choice.estimate.seq_len} tokens before the data was read; "
        f"{kept.reason.removeprefix('as configured: ').removeprefix('as configured, but ')}; "
        f"with this data's {seq_len}-token rows distributed=auto chooses {now}: set "
        f"distributed={again.strategy} to use it"))


# Published shapes of the shipped hub models (each repo's config.json on huggingface.co), so
# the estimate works offline; only the fields the estimate reads.
PUBLISHED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False)),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
        tie_word_embeddings=False)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        tie_word_embeddings=False)),
    "Qwen/Qwen2.5-0.5B-Instruct": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True)),
}


def config_for_estimate(cfg: ModelConfig) -> tuple[Any, str]:
    """(transformers config, where it came from) for the estimate, without loading weights.

    The built-in tiny model and local folders are read; a hub id is read from the local
    Hugging Face cache, else from PUBLISHED_CONFIGS for the shipped models, else from the hub.
    Raises ConfigError (finetune.models.load) when none of these has it.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from finetune.models.load import load_model_config, resolve_model_path

    hf_logging.disable_progress_bar()  # as load_model does: building the tiny model shows one
    name = cfg.name_or_path
    if Path(resolve_model_path(cfg)).exists():  # the tiny model, a local folder or GGUF file
        return load_model_config(cfg), name
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.revision, local_files_only=True,
                                          trust_remote_code=cfg.trust_remote_code), name
    except (OSError, ValueError):
        pass
    if name in PUBLISHED_CONFIGS:
        model_type, sizes = PUBLISHED_CONFIGS[name]
        return (AutoConfig.for_model(model_type, **sizes),
                f"{name} (its published shape; the config is not in the local cache)")
    return load_model_config(cfg), name
