"""`finetune env`: show the hardware profile and the kernel plan a run would get.

    finetune env                                  this machine (self-checked)
    finetune env --profile h100 --assume-packages all
    finetune env --json kernels.attention=sdpa    kernel_plan.json for an override
    finetune env --table                          plan per named profile, as Markdown

Exit status: 0 on success, 2 on a bad option, override or impossible kernel choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys

from finetune.config.kernels import FusedLinearCrossEntropy, KernelsConfig
from finetune.errors import ConfigError
from finetune.hardware import PROFILE_NAMES, detect, profile_by_name
from finetune.hardware.profile import OPTIONAL_PACKAGES, HardwareProfile
from finetune.kernels import (
    KernelOverrideError,
    ModelFacts,
    default_registries,
    format_plan_table,
    plan,
)
from finetune.kernels.table import markdown_kernel_table

# The built-in tiny model's attention shape; `finetune env` plans for it.
TINY_MODEL_FACTS = ModelFacts(num_heads=8, num_kv_heads=4, head_dim=32)
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
    return allowed


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
            values[name] = (FusedLinearCrossEntropy(value)
                            if name == "fused_linear_cross_entropy" else value)
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
        "default: what is installed here, or none for a simulated profile",
    )
    parser.add_argument("--json", action="store_true", help="print kernel_plan.json")
    parser.add_argument(
        "--table", action="store_true",
        help="print the Markdown plan table over every named profile (assume-packages all)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="kernels.KEY=VALUE", help="kernel choices to force",
    )
    return parser


def _profile(name: str | None, assume_packages: str | None) -> HardwareProfile:
    if name is not None:
        return profile_by_name(name, assume_packages or "none")
    profile = detect()
    if assume_packages == "all":
        return profile.with_packages(frozenset(OPTIONAL_PACKAGES))
    if assume_packages == "none":
        return profile.with_packages(frozenset())
    return profile


def main(argv: list[str]) -> int:
    """Run `finetune env` with `argv` (the arguments after `env`); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2, already printed)
        return int(exc.code or 0)
    try:
        cfg = parse_kernel_overrides(args.overrides)
        if args.table:
            print(markdown_kernel_table(args.assume_packages or "all"), end="")
            return 0
        kernel_plan = plan(_profile(args.profile, args.assume_packages), cfg, TINY_MODEL_FACTS)
    except (UsageError, KernelOverrideError, ValueError) as exc:
        print(f"finetune env: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(kernel_plan.to_dict(), indent=2))
    else:
        print(format_plan_table(kernel_plan))
    return 0
