"""`finetune validate RECIPE [OVERRIDES...] [--nproc N] [--profile NAME]`: compose and check a
config, print it resolved, and estimate the memory a run needs per device.

The resolved config goes to stdout (valid YAML, so it can be redirected to a file); the memory
estimate and the strategy `distributed=auto` would pick go to stderr as `#` comment lines, for
this machine or a named simulated one (`--profile h100`), for `--nproc` processes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.commands.run import _process_count
from finetune.errors import ConfigError
from finetune.hardware import PROFILE_NAMES
from finetune.hardware.profile import HardwareProfile

if TYPE_CHECKING:  # torch-importing modules stay out of the parser every `finetune` call builds
    from finetune.config.schema import RunConfig
    from finetune.distributed.checkpointing import CheckpointingChoice
    from finetune.distributed.choose import StrategyChoice
    from finetune.kernels.kernel_plan import KernelPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `validate`'s arguments; overrides may come in any order."""
    parser.add_argument("recipe", metavar="RECIPE",
                        help="a shipped recipe (see `finetune ls`) or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="OVERRIDES",
                        help="Hydra syntax, as for `finetune run`")
    parser.add_argument("--nproc", type=_process_count, default=1, metavar="N",
                        help="estimate memory for N processes, as `finetune run --nproc N` "
                        "starts them (default 1)")
    parser.add_argument("--profile", metavar="NAME",
                        help="estimate for a named simulated machine instead of this one: "
                        f"{', '.join(PROFILE_NAMES)}")


@dataclass(frozen=True)
class MemoryReport:
    """The strategy a run would get and its memory estimate, or why there is none.

    `model`: where the model's shape came from; `seq_len_from`: how the row length was decided.
    """

    choice: StrategyChoice | None
    model: str
    nproc: int
    profile: HardwareProfile
    seq_len_from: str = ""
    error: str | None = None
    checkpointing: CheckpointingChoice | None = None

    @classmethod
    def unavailable(cls, model: str, nproc: int, profile: HardwareProfile,
                    error: str) -> MemoryReport:
        """A report without an estimate, saying why."""
        return cls(None, model, nproc, profile, error=error)

    def lines(self) -> list[str]:
        """The display: what was estimated for, the choice with its reason, the estimate."""
        simulated = ", simulated" if self.profile.simulated else ""
        head = [f"memory estimate: {self.model} on {self.nproc} process"
                f"{'es' if self.nproc > 1 else ''} ({self.profile.name}{simulated}, "
                f"{self.profile.device_count} device{'s' if self.profile.device_count > 1 else ''}"
                f" of {self.profile.memory_gb} GiB)"]
        if self.choice is None:
            return [*head, f"not estimated: {self.error}"]
        if self.seq_len_from not in ("data", "data.max_seq_len"):
            head.append(f"row length: {self.seq_len_from}")
        lines = [*head, *self.choice.describe().splitlines()]
        if self.checkpointing is not None:
            lines.append(self.checkpointing.headline())
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The `memory` block of `finetune env --json`."""
        data: dict[str, Any] = {"model": self.model, "nproc": self.nproc}
        if self.choice is None:
            return {**data, "error": self.error}
        checkpointing = (None if self.checkpointing is None else
                         {"enabled": self.checkpointing.enabled,
                          "reason": self.checkpointing.reason})
        return {**data, "seq_len_from": self.seq_len_from, **self.choice.to_dict(),
                "gradient_checkpointing": checkpointing}


def estimate_run(cfg: RunConfig, profile: HardwareProfile, nproc: int, *, pairs: bool,
                 kernel_plan: KernelPlan | None = None,
                 model: tuple[Any, str] | None = None) -> MemoryReport:
    """Estimate `cfg` on `profile` with `nproc` processes on one machine.

    `kernel_plan` gives the dtypes, optimizer and attention; None plans for `profile` without
    self-checks. `model` is (transformers config, source) when already loaded. A model config
    or kernel choice that is not available here gives a report with `error`; a strategy that
    cannot run on `nproc` processes raises ConfigError, as the run would.
    """
    from finetune.distributed.checkpointing import with_checkpointing
    from finetune.distributed.choose import choose_strategy, workload_from_run
    from finetune.kernels import plan
    from finetune.models import model_facts

    if model is None:
        model = model_config(cfg)
        if isinstance(model, str):
            return MemoryReport.unavailable(cfg.model.name_or_path, nproc, profile, model)
    hf_config, source = model
    if kernel_plan is None:
        try:
            kernel_plan = plan(profile, cfg.kernels, model_facts(hf_config), run_selfcheck=False,
                               packing=cfg.data.packing)
        except ConfigError as exc:
            return MemoryReport.unavailable(
                source, nproc, profile, f"{exc} (--profile NAME estimates for another machine)")
    workload = workload_from_run(cfg, hf_config, kernel_plan, pairs=pairs)
    choice = choose_strategy(cfg.distributed, workload, profile, nproc, local_processes=nproc)
    checkpointing, choice = with_checkpointing(cfg.trainer.gradient_checkpointing, choice,
                                               cfg.distributed, profile, nproc)
    return MemoryReport(choice, source, nproc, profile, seq_len_from=workload.seq_len_from,
                        checkpointing=checkpointing)


def model_config(cfg: RunConfig) -> tuple[Any, str] | str:
    """(transformers config, where it came from) of the run's model, or why it is not
    available here (finetune.distributed.choose.config_for_estimate)."""
    from finetune.distributed.choose import config_for_estimate

    try:
        return config_for_estimate(cfg.model)
    except ConfigError as exc:  # its message says how to point at a local folder instead
        return str(exc)


def run(args: argparse.Namespace) -> int:
    """Print the resolved config.yaml a run would write and, on stderr, the memory estimate;
    a bad config raises ConfigError."""
    from finetune.config import config_yaml
    from finetune.config.compose import compose_run_config
    from finetune.hardware import detect, profile_by_name
    from finetune.train.activation_offload import check_activation_offload
    from finetune.train.recipe import load_recipe
    from finetune.train.run import check_before_work

    cfg = compose_run_config(args.recipe, args.overrides)
    recipe = load_recipe(cfg.recipe)
    check_before_work(cfg, recipe)
    try:
        profile = profile_by_name(args.profile) if args.profile else detect()
    except ValueError as exc:
        raise ConfigError(f"--profile: {exc}") from None
    check_activation_offload(cfg.trainer.activation_offload, profile)
    report = estimate_run(cfg, profile, args.nproc, pairs=recipe.pairs)
    print(config_yaml(cfg), end="")
    sys.stdout.flush()
    print("\n".join(f"# {line}" for line in report.lines()), file=sys.stderr)
    print(f"# ok: {args.recipe} composes and validates", file=sys.stderr)
    return 0
