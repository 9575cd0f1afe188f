"""`finetune merge RUN_OR_CHECKPOINT OUT_DIR`: a merged Hugging Face model folder."""

from __future__ import annotations

from finetune.errors import ConfigError


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        raise ConfigError("usage: finetune merge RUN_OR_CHECKPOINT OUT_DIR — RUN is a run "
                          "directory (its final/ adapter is used) or checkpoints/step_NNNNNNN.")
    from finetune.adapters.export import merge_to_folder

    out = merge_to_folder(argv[0], argv[1])
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
