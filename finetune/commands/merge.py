"""`finetune merge RUN_OR_CHECKPOINT OUT_DIR`: a merged Hugging Face model folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `merge`'s arguments."""
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its final/ adapter is used) or "
                             "checkpoints/step_NNNNNNN")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (safetensors)")


def run(args: argparse.Namespace) -> int:
    """Merge the adapter into its base model and write the folder."""
    from finetune.adapters.export import merge_to_folder

    out = merge_to_folder(args.source, args.out_dir)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
