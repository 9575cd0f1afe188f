"""The `finetune` command: one argument parser for every verb, dispatch, and exit codes.

Each verb's code lives in finetune/commands/, which lists the verbs in COMMANDS. An error meant
for the user is a FinetuneError: it prints one "error: ..." paragraph and exits with its
`exit_code` (0 ok, 2 bad usage/config/data, 75 preempted); any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import NoReturn

from finetune.commands import COMMANDS, Command
from finetune.dependencies import missing_dependency_message
from finetune.errors import ConfigError, FinetuneError
from finetune.metrics.console_log import setup_logging

EPILOG = """RECIPE is a shipped recipe name (see `finetune ls`) or a path to a YAML config.
Exit codes: 0 ok, 2 bad usage/config/data, 75 preempted (checkpoint saved; resume=auto)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ConfigErrors: one paragraph, exit code 2."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise ConfigError(f"{message}. Usage: {usage} (`{self.prog} --help` explains).")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line; `args.command` is the chosen Command."""
    parser = _Parser(prog="finetune", usage="finetune COMMAND [ARGS...]", epilog=EPILOG,
                     description=_overview(), formatter_class=argparse.RawDescriptionHelpFormatter)
    top = parser.add_subparsers(metavar="COMMAND", required=True, help=argparse.SUPPRESS)
    groups = {}  # verb groups, e.g. `data` of `data inspect`: their subparsers
    for name, command in COMMANDS.items():
        *group, verb = name.split()
        verbs = top
        if group:
            if group[0] not in groups:
                outer = top.add_parser(group[0], prog=f"finetune {group[0]}")
                groups[group[0]] = outer.add_subparsers(metavar="COMMAND", required=True)
            verbs = groups[group[0]]
        if command.own_parser:  # every word after the verb, options and --help included
            sub = verbs.add_parser(verb, prog=f"finetune {name}", help=command.help,
                                   add_help=False, prefix_chars="\0")
            sub.add_argument("argv", nargs=argparse.REMAINDER)
        else:
            sub = verbs.add_parser(verb, prog=f"finetune {name}", help=command.help,
                                   description=command.help)
            _module(command).add_arguments(sub)
        sub.set_defaults(command=command, verb_parser=sub)
    return parser


def _overview() -> str:
    """The list of commands in `finetune --help`: synopsis, then what it does."""
    lines = ["commands:"]
    for name, command in COMMANDS.items():
        synopsis = f"  {name} {command.synopsis}".rstrip()
        helps = textwrap.wrap(command.help, 52)
        if len(synopsis) > 45:
            lines.append(synopsis)
            synopsis = ""
        lines += [f"{synopsis:<47}{helps[0]}", *(" " * 47 + line for line in helps[1:])]
    return "\n".join(lines)


def _module(command: Command):
    return importlib.import_module(f"finetune.commands.{command.module}")


def dispatch(argv: list[str]) -> int:
    """Parse `argv` (the words after `finetune`) and run the verb; return its exit code."""
    parser = build_parser()
    if not argv or argv[0] == "help":
        parser.print_help()
        return 0 if argv else 2
    verbs = sorted({name.split()[0] for name in COMMANDS})
    if not argv[0].startswith("-") and argv[0] not in verbs:
        raise ConfigError(f"unknown command '{argv[0]}'. Commands: {', '.join(sorted(COMMANDS))}."
                          " See `finetune --help`.")
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, printed
        return int(exc.code or 0)
    if isinstance(getattr(args, "overrides", None), list):
        # argparse leaves the overrides that follow an option (`RECIPE --nproc 2 k=v`) unparsed.
        args.overrides = [*args.overrides, *(word for word in extras if not word.startswith("-"))]
        extras = [word for word in extras if word.startswith("-")]
    if extras:
        args.verb_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    command = args.command
    return _module(command).main(args.argv) if command.own_parser else _module(command).run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    setup_logging()
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # an install without its dependencies (offline nodes)
        message = missing_dependency_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (inside it, a checkpoint)
        print("interrupted (Ctrl-C); checkpoints already written are intact.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
