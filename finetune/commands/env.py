"""`finetune env`: show the hardware profile, the kernel plan a run would get, and the memory
it needs per device with the strategy `distributed=auto` would pick.

    finetune env                                  this machine (self-checked)
    finetune env --profile h100 --assume-packages all
    finetune env --json kernels.attention=sdpa    kernel_plan.json for an override
    finetune env --table                          plan per named profile, as Markdown
    finetune env --profile h100 --nproc 8 model=llama3_1_8b peft=none
                                                  memory of a full 8B fine-tune on 8 GPUs
    finetune env --autotune [--doc-length N] data.packing=true
                                                  time every candidate that passes its
                                                  self-check at the run's shapes, here

The memory estimate is for `--recipe` (default lora_sft) with the other overrides in Hydra
syntax (model=..., peft=..., trainer.micro_batch_size=...), on `--nproc` processes.

Exit status: 0 on success, 2 on a bad option, override or impossible kernel choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys

from finetune.commands.run import _process_count
from finetune.commands.validate import MemoryReport, estimate_run, model_config
from finetune.config.compose import compose_run_config
from finetune.config.kernels import Autotune, FusedLinearCrossEntropy, KernelsConfig
from finetune.dependencies import optional_extra_lines
from finetune.errors import ConfigError
from finetune.hardware import PROFILE_NAMES, detect, profile_by_name
from finetune.hardware.profile import GPU_TORCH_PACKAGES, OPTIONAL_PACKAGES, HardwareProfile
from finetune.kernels import (
    ModelFacts,
    default_registries,
    format_plan_table,
    plan,
)
from finetune.kernels.table import markdown_kernel_table
from finetune.models import model_facts
from finetune.train.recipe import load_recipe

# The built-in tiny model's attention shape: the plan's model when the recipe's model config
# cannot be read here.
TINY_MODEL_FACTS = ModelFacts(num_heads=8, num_kv_heads=4, head_dim=32)
DEFAULT_RECIPE = "lora_sft"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class UsageError(ConfigError):
    """A command-line mistake; the message is shown as is."""


def _allowed_values() -> dict[str, tuple[str, ...]]:
    registries = default_registries()
    allowed = {
        f.name: ("auto", *getattr(registries, f.name).names())
        for f in dataclasses.fields(registries)
    }
    allowed["fused_linear_cross_entropy"] = tuple(m.value for m in FusedLinearCrossEntropy)
    allowed["autotune"] = tuple(m.value for m in Autotune)
    return allowed


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(kernels.KEY=VALUE items, the other Hydra overrides). A bare kernels key
    (`attention=sdpa`) raises UsageError naming the `kernels.` form."""
    kernel_keys = {f.name for f in dataclasses.fields(KernelsConfig)}
    kernels, others = [], []
    for item in items:
        key, sep, _ = item.partition("=")
        if key.startswith("kernels."):
            kernels.append(item)
        elif not sep or key.lstrip("+~") in kernel_keys:
            raise UsageError(
                f"{item!r} is not an override of the form kernels.KEY=VALUE "
                f"(for example kernels.attention=sdpa) or a config override (model=qwen2_5_7b)."
            )
        else:
            others.append(item)
    return kernels, others


def parse_kernel_overrides(items: list[str]) -> KernelsConfig:
    """`kernels.KEY=VALUE` items -> KernelsConfig. Raises UsageError naming the fix."""
    fields = {f.name: f for f in dataclasses.fields(KernelsConfig)}
    allowed = _allowed_values()
    values: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("kernels."):
            raise UsageError(
                f"{item!r} is not an override of the form kernels.KEY=VALUE "
                f"(for example kernels.attention=sdpa)."
            )
        name = key.removeprefix("kernels.")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" Did you mean kernels.{close[0]}?" if close else ""
            raise UsageError(
                f"unknown kernels key {name!r}.{hint} Known keys: {', '.join(fields)}."
            )
        if isinstance(fields[name].default, bool):
            if value.lower() not in _TRUE + _FALSE:
                raise UsageError(f"kernels.{name} takes true or false, got {value!r}.")
            values[name] = value.lower() in _TRUE
        elif value not in allowed.get(name, (value,)):
            raise UsageError(
                f"kernels.{name}={value} is not a known choice; use one of: "
                f"{', '.join(allowed[name])}."
            )
        else:
            choices = {"fused_linear_cross_entropy": FusedLinearCrossEntropy,
                       "autotune": Autotune}
            values[name] = choices[name](value) if name in choices else value
    return KernelsConfig(**values)  # type: ignore[arg-type]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune env",
        description="Show the detected (or a simulated) machine and the kernel plan for it.",
    )
    parser.add_argument(
        "--profile", metavar="NAME",
        help=f"simulate a named machine instead of detecting this one: {', '.join(PROFILE_NAMES)}",
    )
    parser.add_argument(
        "--assume-packages", choices=("all", "none"),
        help="pretend every optional kernel package is (all) or is not (none) installed; "
        "none keeps what a GPU build of torch ships with it (triton); default: what is "
        "installed here, or none for a simulated profile",
    )
    parser.add_argument("--json", action="store_true",
                        help="print kernel_plan.json with a `memory` block")
    parser.add_argument(
        "--table", action="store_true",
        help="print the Markdown plan table over every named profile (assume-packages all)",
    )
    parser.add_argument(
        "--recipe", default=DEFAULT_RECIPE, metavar="RECIPE",
        help=f"the recipe whose memory is estimated (default {DEFAULT_RECIPE})",
    )
    parser.add_argument(
        "--nproc", type=_process_count, default=1, metavar="N",
        help="estimate memory for N processes on this machine, as `finetune run --nproc N` "
        "starts them (default 1)",
    )
    parser.add_argument(
        "--autotune", action="store_true",
        help="time every candidate that passes its self-check on this machine at the recipe's "
        "shapes (kernels.autotune) and print the measurements and the plan they give",
    )
    parser.add_argument(
        "--doc-length", type=_process_count, default=None, metavar="N",
        help="with --autotune: the mean document length timed (default: a quarter of the row "
        "with data.packing=true, half a row without)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDES",
        help="kernel choices to force (kernels.KEY=VALUE) and config overrides for the memory "
        "estimate (model=llama3_1_8b peft=none trainer.micro_batch_size=1)",
    )
    return parser


def _profile(name: str | None, assume_packages: str | None) -> HardwareProfile:
    if name is not None:
        return profile_by_name(name, assume_packages or "none")
    profile = detect()
    if assume_packages == "all":
        return profile.with_packages(frozenset(OPTIONAL_PACKAGES))
    if assume_packages == "none":
        return profile.with_packages(profile.packages & frozenset(GPU_TORCH_PACKAGES))
    return profile


def main(argv: list[str]) -> int:
    """Run `finetune env` with `argv` (the arguments after `env`); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2, already printed)
        return int(exc.code or 0)
    try:
        kernel_items, config_items = split_overrides(args.overrides)
        cfg = parse_kernel_overrides(kernel_items)
        if args.table:
            print(markdown_kernel_table(args.assume_packages or "all"), end="")
            return 0
        if args.autotune and args.profile:
            raise UsageError("--autotune times this machine's kernels; it cannot be combined "
                             "with --profile (a simulated machine has no kernels to time).")
        profile = _profile(args.profile, args.assume_packages)
        run_cfg = compose_run_config(args.recipe, kernel_items + config_items)
        if args.autotune:
            return _autotune(profile, cfg, run_cfg, args.doc_length, as_json=args.json)
        model = model_config(run_cfg)
        facts = TINY_MODEL_FACTS if isinstance(model, str) else model_facts(model[0])
        kernel_plan = plan(profile, cfg, facts, packing=run_cfg.data.packing)
        if isinstance(model, str):
            report = MemoryReport.unavailable(run_cfg.model.name_or_path, args.nproc, profile,
                                              model)
        else:
            report = estimate_run(run_cfg, profile, args.nproc, kernel_plan=kernel_plan,
                                  model=model, pairs=load_recipe(run_cfg.recipe).pairs)
    except (ConfigError, ValueError) as exc:  # UsageError and KernelOverrideError among them
        print(f"finetune env: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**kernel_plan.to_dict(), "memory": report.to_dict()}, indent=2))
    else:
        print(format_plan_table(kernel_plan))
        print()
        print("\n".join(report.lines()))
        print()
        print("\n".join(optional_extra_lines()))
    return 0



def _autotune(profile: HardwareProfile, cfg: KernelsConfig, run_cfg, doc_length: int | None, *,
              as_json: bool) -> int:
    """`finetune env --autotune`: measure, print the timings and the plan they give."""
    from finetune.hardware.arch import device_type
    from finetune.kernels.autotune import (
        MeasuringTuner,
        cache_path,
        measure_matmul_rates,
        measured_dict,
        write_cache,
    )
    from finetune.models import load_model_config
    from finetune.train.tuning import run_shapes

    hf_config = load_model_config(run_cfg.model)
    facts = model_facts(hf_config)
    table = plan(profile, cfg, facts, packing=run_cfg.data.packing)
    device = device_type(profile)
    shapes = run_shapes(run_cfg, hf_config, table, device, mean_document=doc_length)
    tuner = MeasuringTuner(shapes, device)
    tuned = plan(profile, cfg, facts, packing=run_cfg.data.packing, tuner=tuner)
    rates = measure_matmul_rates(device)
    measured = measured_dict(tuner.measured)
    write_cache(cache_path(profile, shapes), {"shapes": shapes.describe(), "measured": measured})
    write_cache(cache_path(profile, None), {"tflops": rates})
    if as_json:
        print(json.dumps({"shapes": shapes.describe(), "matmul_tflops": rates,
                          "measured": measured, "seconds": round(tuner.seconds, 3),
                          "kernel_plan": tuned.to_dict()}, indent=2))
        return 0
    print(f"autotune on {profile.name} at {shapes.describe()} ({tuner.seconds:.1f} s)")
    print(f"dense matmul: bf16 {rates['bf16']:.4g} TFLOP/s, fp32 {rates['fp32']:.4g} TFLOP/s")
    for family, found in tuner.measured.items():
        table_first = table.choice(family)
        for name, timing in sorted(found.items(), key=lambda item: item[1].median_ms):
            marks = [m for m, on in (("chosen", name == tuned.choice(family)),
                                     ("table's choice", name == table_first)) if on]
            print(f"  {family:<10} {name:<16} {timing.median_ms:10.3f} ms "
                  f"({timing.low_ms:.3f}-{timing.high_ms:.3f}) {', '.join(marks)}")
    print()
    print(format_plan_table(tuned))
    return 0
