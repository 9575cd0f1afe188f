"""The `finetune` command: parses the sub-command and hands recipe runs to Hydra.

    finetune run RECIPE [OVERRIDES...] [--nproc N] [-m]
    finetune ls | cp CONFIG DEST | validate RECIPE [OVERRIDES...]
    finetune env [--profile NAME] [--assume-packages all] [--json] [--table]
    finetune data inspect RECIPE [OVERRIDES...] [--json]
    finetune merge RUN_OR_CHECKPOINT OUT_DIR
    finetune generate MODEL_OR_RUN --prompt TEXT
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError

USAGE = """usage: finetune COMMAND [ARGS...]

commands:
  run RECIPE [OVERRIDES...] [--nproc N] [-m]   train; overrides use Hydra syntax
                                               (trainer.max_steps=50 peft.r=16 model=qwen2_5_7b
                                               +new.key=1 ~key); -m sweeps comma lists
  ls                                           list recipes and config groups
  cp CONFIG DEST                               copy a shipped config (lora_sft, trainer/quick...)
  validate RECIPE [OVERRIDES...]               compose + check, print the resolved config
  env [--profile NAME] [--assume-packages all] [--json] [--table] [kernels.K=V...]
                                               hardware and the kernel plan
  data inspect RECIPE [OVERRIDES...] [--json]  dataset statistics after templating and packing
  merge RUN_OR_CHECKPOINT OUT_DIR              merge a LoRA run into a full HF model folder
  generate MODEL_OR_RUN --prompt TEXT          sample from a model or a fine-tuned run

RECIPE is a shipped recipe name (see `finetune ls`) or a path to a YAML config.
Exit codes: 0 ok, 2 bad usage/config/data, 75 preempted (checkpoint saved; resume=auto).
"""


def _setup_logging() -> None:
    level = os.environ.get("FINETUNE_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("finetune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # peft calls a transformers method that transformers 5 renamed; the warning is not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    if os.environ.get("RANK", "0") != "0":
        root.setLevel(logging.WARNING)


def _split_flags(args: list[str], flags_with_value: set[str],
                 bool_flags: set[str]) -> tuple[dict, list[str]]:
    found: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in flags_with_value:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} 2.")
            found[arg] = args[i + 1]
            i += 2
            continue
        if arg in bool_flags:
            found[arg] = True
        else:
            rest.append(arg)
        i += 1
    return found, rest


def _recipe_module(cfg_recipe: str):
    from finetune.config.compose import recipe_names

    if cfg_recipe not in recipe_names():
        raise ConfigError(f"recipe={cfg_recipe!r} in the config names no recipe. Recipes: "
                          f"{', '.join(recipe_names())}.")
    return importlib.import_module(f"finetune.recipes.{cfg_recipe}")


def cmd_run(args: list[str]) -> int:
    from finetune.config.compose import compose_run_config, resolve_recipe
    from finetune.train.run_dir import default_output_dir

    flags, rest = _split_flags(args, {"--nproc"}, {"-m", "--multirun"})
    if not rest:
        raise ConfigError("finetune run needs a recipe, e.g. `finetune run lora_sft`. "
                          "`finetune ls` lists them.")
    recipe, overrides = rest[0], rest[1:]
    multirun = bool(flags.get("-m") or flags.get("--multirun"))
    try:
        nproc = int(flags.get("--nproc", 1))
    except ValueError:
        raise ConfigError(f"--nproc {flags['--nproc']}: give a whole number of processes.") from None
    config_dir, config_name = resolve_recipe(recipe)
    cfg = None
    if not multirun:
        cfg = compose_run_config(recipe, overrides)  # every key and type checked before work
        if cfg.output_dir is None:
            overrides = [*overrides, f"output_dir={default_output_dir(cfg.recipe)}"]
    elif not any(o.startswith("output_dir=") for o in overrides):
        overrides = [*overrides, f"output_dir={default_output_dir(Path(recipe).stem)}"]
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        if multirun:
            raise ConfigError("-m sweeps run one job after another in this process; combine "
                              "them with --nproc by launching each job separately.")
        return _launch_processes(nproc, recipe, overrides, Path(cfg.output_dir or
                                 next(o.split("=", 1)[1] for o in overrides
                                      if o.startswith("output_dir="))))
    return _hydra_run(config_dir, config_name, overrides, multirun)


def _launch_processes(nproc: int, recipe: str, overrides: list[str], output_dir: Path) -> int:
    """Run the recipe on `nproc` processes with torchrun (torch.distributed.run).

    torchrun runs in its own process group, so a terminal's Ctrl-C reaches only this process,
    which forwards one SIGTERM: each rank then finishes its step and the ranks save one
    checkpoint together. torchrun reports a rank's exit 75 as a plain failure, so the
    preemption marker the run leaves in output_dir restores the documented exit code.
    """
    from finetune.train.signals import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "finetune.cli", "run", recipe, *overrides]
    proc = subprocess.Popen(command, start_new_session=True)

    def forward(_signum: int, _frame: object) -> None:
        proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and (output_dir / PREEMPTED_MARKER).is_file():
        return PREEMPTED_EXIT_CODE
    return code


def _hydra_run(config_dir: Path, config_name: str, overrides: list[str], multirun: bool) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from finetune.config.compose import shipped_config_dir, to_run_config
    from finetune.config.schema import register_schemas
    from finetune.train.run_dir import default_output_dir

    register_schemas()
    failures: list[str] = []
    codes: list[int] = []

    @hydra.main(config_path=str(config_dir), config_name=config_name, version_base=None)
    def task(dict_cfg) -> None:
        # Errors are handled here: Hydra would turn them into a traceback and exit code 1.
        label = ""
        try:
            cfg = to_run_config(dict_cfg)
            if multirun:
                job = HydraConfig.get().job
                label = f"job {job.num} ({job.override_dirname}): "
                base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
                cfg.output_dir = str(base / f"job{job.num}")
                print(f"[sweep job {job.num}] {job.override_dirname} -> {cfg.output_dir}")
            codes.append(_recipe_module(cfg.recipe).train(cfg))
        except Exception as exc:
            code = _exit_code_for(exc)
            if code is None:
                raise
            if not multirun:
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(code) from None
            failures.append(f"{label}{exc}")
            codes.append(code)

    # A sweep's jobs go to OUTPUT_DIR/jobN; Hydra's record of the sweep, multirun.yaml, to
    # OUTPUT_DIR itself. Hydra creates no other directory and leaves logging alone.
    sweep_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), ".")
    hydra_args = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
                  "hydra/hydra_logging=none", f"hydra.sweep.dir={sweep_dir}",
                  "hydra.sweep.subdir=."]
    if config_dir != shipped_config_dir():
        hydra_args.append(f"hydra.searchpath=[file://{shipped_config_dir()}]")
    saved_argv = sys.argv
    sys.argv = ["finetune", *overrides, *hydra_args, *(["-m"] if multirun else [])]
    try:
        task()
    finally:
        sys.argv = saved_argv
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return max(codes, default=0)


def cmd_ls(_args: list[str]) -> int:
    from finetune.config.compose import recipe_names, shipped_config_dir

    root = shipped_config_dir()
    print("recipes:")
    for name in recipe_names():
        module = importlib.import_module(f"finetune.recipes.{name}")
        doc = (module.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    print("\nconfig groups (select with GROUP=OPTION, copy with `finetune cp GROUP/OPTION`):")
    for group in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(p.stem for p in group.glob("*.yaml"))
        if options:
            print(f"  {group.name + '/':<10} {', '.join(options)}")
    return 0


def cmd_cp(args: list[str]) -> int:
    from finetune.config.compose import shipped_config_dir

    if len(args) != 2:
        raise ConfigError("usage: finetune cp CONFIG DEST, e.g. `finetune cp lora_sft my.yaml` "
                          "or `finetune cp trainer/quick my_trainer.yaml`.")
    name, dest = args
    source = shipped_config_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not source.is_file():
        raise ConfigError(f"no shipped config named '{name}'. `finetune ls` lists them "
                          "(recipes by name, group options as group/option).")
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"{target} already exists; not overwriting it. Choose another DEST.")
    shutil.copyfile(source, target)
    group = name.split("/")[0]
    hint = (f"run it with `finetune run {target}`" if "/" not in name
            else f"paste its values under `{group}:` in a recipe copy (`finetune cp lora_sft "
                 "my.yaml`) and run that")
    print(f"copied {name} to {target}; {hint}")
    return 0


def cmd_validate(args: list[str]) -> int:
    from finetune.config.compose import compose_run_config
    from finetune.train.run import config_yaml

    if not args:
        raise ConfigError("usage: finetune validate RECIPE [OVERRIDES...]")
    cfg = compose_run_config(args[0], args[1:])
    print(config_yaml(cfg), end="")
    print(f"# ok: {args[0]} composes and validates", file=sys.stderr)
    return 0


def _delegate(module: str, args: list[str]) -> int:
    return importlib.import_module(f"finetune.commands.{module}").main(args)


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command == "data":
        if not args or args[0] != "inspect":
            raise ConfigError("usage: finetune data inspect RECIPE [OVERRIDES...] [--json]")
        return _delegate("data_inspect", args[1:])
    handlers = {"run": cmd_run, "ls": cmd_ls, "cp": cmd_cp, "validate": cmd_validate,
                "env": lambda a: _delegate("env", a), "merge": lambda a: _delegate("merge", a),
                "generate": lambda a: _delegate("generate", a)}
    if command not in handlers:
        raise ConfigError(f"unknown command '{command}'. Commands: {', '.join(sorted(handlers))}, "
                          "data inspect. See `finetune --help`.")
    if command in ("run", "validate") and args and args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    return handlers[command](args)


def _exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a user-facing error, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, FinetuneError):
        return exc.exit_code
    from finetune.data.errors import DataError
    from finetune.kernels import KernelOverrideError

    return 2 if isinstance(exc, DataError | KernelOverrideError) else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    _setup_logging()
    try:
        code = dispatch(sys.argv[1:] if argv is None else argv)
    except Exception as exc:
        exit_code = _exit_code_for(exc)
        if exit_code is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = exit_code
    return code


if __name__ == "__main__":
    sys.exit(main())
