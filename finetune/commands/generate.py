"""`finetune generate MODEL_OR_RUN`: sample from a model or a fine-tuned run.

One prompt (`--prompt`, streamed to the terminal as it is generated), a file of prompts
(`--prompts FILE.jsonl`, completions written as JSON lines to `--out` or stdout), or a chat
(`--interactive`). The chat template is the run's (or the model's); the same seed gives the same
completion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from finetune.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `generate`'s arguments."""
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="a run dir, checkpoint dir, adapter or model folder, a hub id, or "
                             "tiny")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="one user message")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help='one prompt a line: {"prompt": TEXT}, {"messages": [...]} or a JSON '
                           "string")
    what.add_argument("--interactive", action="store_true",
                      help="chat in the terminal (/reset starts over, /exit or Ctrl-D quits)")
    parser.add_argument("--out", metavar="FILE.jsonl",
                        help="with --prompts: where the completions go (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling when --temperature > 0 (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="set before each prompt")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt as raw text")


def read_prompts(path: Path) -> list:
    """The prompts of a .jsonl file (see --prompts); ConfigError naming file:line and field."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc}).") from None
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt))):
            raise ConfigError(f'{path}:{number}: needs a "prompt" (text or a list of '
                              '{"role", "content"} messages), a "messages" list, or a JSON '
                              "string.")
        prompts.append(prompt)
    return prompts


def run(args: argparse.Namespace) -> int:
    """Generate as asked; print (or write) the completions."""
    from transformers import TextStreamer

    from finetune.evaluate import Sampling, generate_text, load_for_inference

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    if args.out and not args.prompts:
        raise ConfigError("--out goes with --prompts FILE.jsonl.")
    prompts = read_prompts(Path(args.prompts)) if args.prompts else None
    loaded = load_for_inference(args.source)
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = not args.no_chat_template
    if prompts is not None:
        target = (open(args.out, "w", encoding="utf-8") if args.out
                  else contextlib.nullcontext(sys.stdout))
        with target as out:
            for prompt in prompts:
                text = generate_text(model, tokenizer, prompt, sampling, chat=chat)
                out.write(json.dumps({"prompt": prompt, "completion": text},
                                     ensure_ascii=False) + "\n")
                out.flush()
        if args.out:
            print(f"{len(prompts)} completions written to {args.out}", file=sys.stderr)
        return 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not args.interactive:
        generate_text(model, tokenizer, args.prompt, sampling, chat=chat, streamer=streamer)
        return 0
    return _chat(model, tokenizer, sampling, chat=chat, streamer=streamer)


def _chat(model, tokenizer, sampling, *, chat: bool, streamer) -> int:
    from finetune.evaluate import generate_text

    print("type a message; /reset starts a new conversation, /exit or Ctrl-D quits",
          file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            continue
        if not command:
            continue
        if not chat:
            generate_text(model, tokenizer, line, sampling, chat=False, streamer=streamer)
            continue
        history.append({"role": "user", "content": line})
        reply = generate_text(model, tokenizer, history, sampling, streamer=streamer)
        history.append({"role": "assistant", "content": reply})
