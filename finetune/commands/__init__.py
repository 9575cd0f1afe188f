"""One module per `finetune` verb; `finetune.cli` parses the command line and dispatches.

A verb module declares its arguments with `add_arguments(parser)` and does the work in
`run(args) -> int`, the exit code; one that parses its own arguments (env, data_inspect) gets
the words after the verb in `main(argv) -> int`. Mistakes a user can fix raise FinetuneError.
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """A verb: its module in finetune.commands, its arguments and what it does.

    With `own_parser`, the module parses the words after the verb itself (`main(argv)`);
    otherwise it declares them in the `finetune` parser (`add_arguments(parser)`) and runs
    with the parsed namespace (`run(args)`).
    """

    module: str
    synopsis: str
    help: str
    own_parser: bool = False


COMMANDS: dict[str, Command] = {
    "run": Command("run", "RECIPE [OVERRIDES...] [--nproc N] [--nnodes M ...] [-m]",
                   "train; overrides use Hydra syntax (trainer.max_steps=50 peft.r=16 "
                   "model=qwen2_5_7b +new.key=1 ~key); -m sweeps comma lists"),
    "ls": Command("ls", "", "list recipes and config groups"),
    "cp": Command("cp", "CONFIG DEST", "copy a shipped config (lora_sft, trainer/quick...)"),
    "validate": Command("validate", "RECIPE [OVERRIDES...] [--nproc N] [--profile NAME]",
                        "compose + check, print the resolved config and the memory estimate"),
    "env": Command("env", "[--profile NAME] [--assume-packages all] [--json] [--table] "
                   "[--recipe R] [--nproc N] [OVERRIDES...]",
                   "hardware, the kernel plan and the memory estimate", own_parser=True),
    "data inspect": Command("data_inspect", "RECIPE [OVERRIDES...] [--json]",
                            "dataset statistics after templating and packing", own_parser=True),
    "merge": Command("merge", "RUN_OR_CHECKPOINT OUT_DIR",
                     "merge a LoRA run into a full HF model folder"),
    "export": Command("export", "RUN_OR_MODEL_DIR OUT --format gguf [--quant f16|bf16|q8_0] "
                      "[--no-verify]", "one GGUF file and an Ollama Modelfile, checked by a "
                      "round trip"),
    "generate": Command("generate", "MODEL_OR_RUN (--prompt TEXT | --prompts FILE.jsonl | "
                        "--interactive)", "sample from a model or a fine-tuned run (streamed; "
                        "--temperature, --top-p, --seed, --max-new-tokens)"),
    "eval": Command("eval", "RUN_OR_MODEL [data.KEY=VALUE...] [--json]",
                    "loss, perplexity and token counts on a dataset (a run's held-out rows by "
                    "default), templated and masked as in training"),
    "report": Command("report", "RUN_DIR [RUN_DIR...] [--plot OUT.png [--force]] [--json]",
                      "compare runs: config differences, loss, throughput, MFU, memory"),
}
