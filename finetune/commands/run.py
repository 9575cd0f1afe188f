"""`finetune run RECIPE [OVERRIDES...] [--nproc N] [-m]`: train a recipe.

A run composes its config once and calls the recipe in this process. `--nproc N` relaunches the
command under torchrun (finetune.train.launch). `-m` runs Hydra's multirun: one job per
combination of the comma lists, one after another, each in OUTPUT_DIR/jobN.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError

# Hydra creates no run or sweep directory of its own and leaves logging alone.
HYDRA_QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none",
               "hydra/hydra_logging=none", "hydra.sweep.subdir=."]


def _process_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of processes, 1 or more "
                                         "(e.g. --nproc 2)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `run`'s arguments; overrides may come before or after the options."""
    parser.add_argument("recipe", nargs="?", metavar="RECIPE",
                        help="a shipped recipe (see `finetune ls`) or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", default=[], metavar="OVERRIDES",
                        help="Hydra syntax: trainer.max_steps=50 peft=dora +new.key=1 ~key; "
                             "with -m, comma lists sweep (optim.lr=1e-4,2e-4)")
    parser.add_argument("--nproc", type=_process_count, default=1, metavar="N",
                        help="processes on this machine, started with torchrun (default 1)")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="sweep the comma lists; job N writes to OUTPUT_DIR/jobN")


def run(args: argparse.Namespace) -> int:
    """Train once, on `args.nproc` processes, or sweep; the exit code (75: preempted)."""
    from finetune.config.compose import compose_run_config
    from finetune.train.run_dir import default_output_dir

    if args.recipe is None:
        raise ConfigError("finetune run needs a recipe, e.g. `finetune run lora_sft`. "
                          "`finetune ls` lists them.")
    launch = args.nproc > 1 and "LOCAL_RANK" not in os.environ  # not yet under torchrun
    if args.multirun:
        if launch:
            raise ConfigError("-m sweeps run one job after another in this process; combine "
                              "them with --nproc by launching each job separately.")
        return sweep(args.recipe, args.overrides)
    cfg = compose_run_config(args.recipe, args.overrides)  # every key and type checked
    overrides = args.overrides
    if cfg.output_dir is None:
        cfg.output_dir = str(default_output_dir(cfg.recipe))
        overrides = [*overrides, f"output_dir={cfg.output_dir}"]  # one directory for all ranks
    if launch:
        from finetune.train.launch import launch_processes

        return launch_processes(args.nproc, args.recipe, overrides, Path(cfg.output_dir))
    from finetune.train.run import run_recipe

    return run_recipe(cfg)


def sweep(recipe: str, overrides: list[str]) -> int:
    """Run each job of a Hydra multirun in this process; the highest exit code of the jobs.

    A job that fails with a FinetuneError does not stop the sweep: its error is printed at the
    end. Hydra writes its record of the sweep, multirun.yaml, into OUTPUT_DIR.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from finetune.config.compose import resolve_recipe, shipped_config_dir, to_run_config
    from finetune.config.schema import register_schemas
    from finetune.train.run import run_recipe
    from finetune.train.run_dir import default_output_dir

    config_dir, config_name = resolve_recipe(recipe)
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides = [*overrides, f"output_dir={default_output_dir(Path(recipe).stem)}"]
    register_schemas()
    failures: list[str] = []
    codes: list[int] = []

    @hydra.main(config_path=str(config_dir), config_name=config_name, version_base=None)
    def task(dict_cfg) -> None:
        # Errors are handled here: Hydra would turn them into a traceback and exit code 1.
        job = HydraConfig.get().job
        label = f"job {job.num} ({job.override_dirname}): "
        try:
            cfg = to_run_config(dict_cfg)
            base = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.recipe)
            cfg.output_dir = str(base / f"job{job.num}")
            print(f"[sweep job {job.num}] {job.override_dirname} -> {cfg.output_dir}")
            codes.append(run_recipe(cfg))
        except FinetuneError as exc:
            failures.append(f"{label}{exc}")
            codes.append(exc.exit_code)

    sweep_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    hydra_args = [*HYDRA_QUIET, f"hydra.sweep.dir={sweep_dir}"]
    if config_dir != shipped_config_dir():
        hydra_args.append(f"hydra.searchpath=[file://{shipped_config_dir()}]")
    saved_argv = sys.argv
    sys.argv = ["finetune", *overrides, *hydra_args, "-m"]  # hydra.main reads sys.argv
    try:
        task()
    finally:
        sys.argv = saved_argv
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return max(codes, default=0)
