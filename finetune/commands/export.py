"""`finetune export RUN_OR_MODEL_DIR OUT --format gguf`: a GGUF file for llama.cpp and Ollama."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `export`'s arguments."""
    parser.add_argument("source", metavar="RUN_OR_MODEL_DIR",
                        help="a run directory (its LoRA is merged first), one of its "
                             "checkpoints/step_NNNNNNN, or a merged or downloaded model folder")
    parser.add_argument("out_dir", metavar="OUT",
                        help="the folder to write: OUT/<name>.gguf and OUT/Modelfile")
    parser.add_argument("--format", choices=["gguf"], required=True,
                        help="the file format (gguf: llama.cpp, Ollama, LM Studio)")
    parser.add_argument("--quant", choices=["f16", "bf16", "q8_0"], default="f16",
                        help="weight storage (default f16)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the round trip through transformers' GGUF loader")


def run(args: argparse.Namespace) -> int:
    """Export, verify, and say where the files are and how they compared."""
    from finetune.export import export_gguf

    path, result = export_gguf(args.source, args.out_dir, quant=args.quant,
                               verify=not args.no_verify)
    if result is not None:
        print(result.summary())
    print(f"GGUF written to {path}; run it with `llama-cli -m {path}` or "
          f"`ollama create NAME -f {path.parent / 'Modelfile'}`")
    return 0
