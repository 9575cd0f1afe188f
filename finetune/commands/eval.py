"""`finetune eval RUN_OR_MODEL [data.KEY=VALUE...] [--json]`: loss, perplexity and token counts.

The data goes through the training pipeline (chat template, masking, data.max_seq_len and
truncation), so the loss is the training objective on those rows. Which rows:

- a run or checkpoint with no data overrides: the run's own held-out rows (data.val_path, or
  the data.val_split of data.path, split as in training);
- `data.path=FILE`: every row of FILE (other data.* overrides apply on top of the run's data
  settings, or of the defaults for a base model or a merged folder);
- `data.val_path=FILE`: every row of that file, with the run's (or given) settings.
"""

from __future__ import annotations

import argparse
import json

from finetune.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `eval`'s arguments; data overrides may come in any order."""
    parser.add_argument("source", metavar="RUN_OR_MODEL",
                        help="a run dir, checkpoints/step_NNNNNNN, an adapter or merged model "
                             "folder, a hub id, or tiny")
    parser.add_argument("overrides", nargs="*", default=[], metavar="data.KEY=VALUE",
                        help="data settings, e.g. data.path=test.jsonl data.max_seq_len=2048")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="rows per forward pass (default 8)")
    parser.add_argument("--max-batches", type=int, default=None, metavar="N",
                        help="evaluate at most N batches (default: every row)")


def eval_data_config(run_config: dict | None, overrides: list[str]):
    """(DataConfig, what is evaluated) from the run's data settings and `overrides` (see the
    module). ConfigError (exit code 2) for an override that is not data.KEY=VALUE, a key or
    value the schema refuses, or no data to evaluate on."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from finetune.config.data import DataConfig

    bad = [o for o in overrides if not o.startswith("data.") or "=" not in o]
    if bad:
        raise ConfigError(f"finetune eval takes data.KEY=VALUE overrides only, not {bad[0]!r} "
                          "(e.g. data.path=test.jsonl).")
    given = {o.split("=", 1)[0].removeprefix("data.") for o in overrides}
    base = dict(run_config["data"]) if run_config else {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), base, OmegaConf.from_dotlist(
            [o.removeprefix("data.") for o in overrides]))
        if OmegaConf.is_missing(merged, "path") or merged.path is None:
            raise ConfigError("give the data to evaluate on: data.path=FILE (only a run or its "
                              "checkpoints know their own data).")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad data override: {str(exc).splitlines()[0]}") from None
    if "path" in given and "val_path" not in given:
        cfg.val_path, what = cfg.path, f"every row of {cfg.path}"
    elif "val_path" in given or cfg.val_path is not None:
        what = f"every row of {cfg.val_path}"
    elif float(cfg.val_split) > 0:
        what = f"the run's held-out rows (data.val_split={cfg.val_split} of {cfg.path})"
    else:
        raise ConfigError("the run held out no rows (data.val_split=0 and no data.val_path); "
                          "pass data.path=FILE to evaluate on.")
    cfg.packing, cfg.streaming = False, False
    return cfg, what


def eval_attention() -> str:
    """The attention a training run on this machine would load for unpacked rows. Where it
    keeps documents apart in one row (sdpa_varlen on CPUs, FlashAttention), the examples are
    scored in padding-free rows, as in training: same losses, no compute spent on padding."""
    from finetune.config.kernels import KernelsConfig
    from finetune.train.setup import planned_attention

    return planned_attention(KernelsConfig(), packing=False)


def run(args: argparse.Namespace) -> int:
    """Print the evaluation (a table, or one JSON object with --json)."""
    from finetune.adapters.export import describe_source
    from finetune.data import build_data
    from finetune.data.settings import check_settings
    from finetune.evaluate import evaluate_loss, load_for_inference
    from finetune.models import context_length

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1.")
    data_cfg, what = eval_data_config(describe_source(args.source).run_config(), args.overrides)
    check_settings(data_cfg)
    attention = eval_attention()
    loaded = load_for_inference(args.source, attention=attention)
    data = build_data(data_cfg, loaded.tokenizer, attention=attention, seed=0,
                      micro_batch_size=args.batch_size,
                      max_context=context_length(loaded.model.config), held_out_apart=False,
                      evaluating=True)
    result = evaluate_loss(loaded.model, data.val_batches(args.max_batches), loaded.device)
    report = {"source": str(args.source), "kind": loaded.source.kind, "data": what,
              **result.to_dict(), "max_seq_len": data.stats.max_seq_len,
              "template": data.stats.template, "device": str(loaded.device),
              "attention": attention, "padding_free": data.stats.padding_free}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"eval {args.source} ({loaded.source.kind}) on {what}")
    print(f"  rows {result.rows}  tokens {result.tokens}  trained tokens {result.trained_tokens}"
          f"  (max_seq_len {data.stats.max_seq_len}, template: {data.stats.template})")
    layout = "padding-free rows" if data.stats.padding_free else "padded rows"
    print(f"  attention {attention}, {layout}")
    if result.loss is None:
        print("  no trained tokens: nothing to measure")
    else:
        print(f"  loss {result.loss:.4f}  perplexity {result.perplexity:.3f}")
    return 0
