"""`finetune generate MODEL_OR_RUN`: sample from a model or a fine-tuned run.

One prompt (`--prompt`, streamed to the terminal as it is generated), a file of prompts
(`--prompts FILE.jsonl`, run `--batch-size` at a time in left-padded batches, completions
written as JSON lines in the file's order to `--out` or stdout), or a chat (`--interactive`).
The chat template is the run's (or the model's); the same seed gives the same completion,
whatever the batch size. `--out` is checked before the model loads and replaced only once every
completion is written, so a failure leaves an earlier file there as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from finetune.errors import ConfigError, FinetuneError


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
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="with --prompts: prompts per generation call, left-padded "
                             "(default 8; 1 runs them one at a time)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling when --temperature > 0 (default 1.0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="each prompt samples from its own generator seeded with it")
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
    if not prompts:
        raise ConfigError(f"--prompts {path}: the file holds no prompt (it is empty or blank); "
                          'give one JSON line per prompt, e.g. {"prompt": "Name a fruit."}.')
    return prompts


@contextlib.contextmanager
def replaced_on_success(path: Path) -> Iterator[TextIO]:
    """A text file to write instead of `path`, renamed over it when the block ends without
    an error and removed otherwise, so `path` is complete or as it was. The file is created on
    entry, with the user's umask: ConfigError (exit code 2) naming `--out` there when `path`
    cannot be written, before any costly work; FinetuneError (exit code 1) when the disk fills
    up later."""
    where = f"--out {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; give a file, e.g. {path / 'completions.jsonl'}.")
    if not path.parent.is_dir():
        raise ConfigError(f"{where}: the folder {path.parent} does not exist (or is not a "
                          "folder); create it or choose another path.")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{where}: the file is read-only; make it writable or choose another "
                          "path.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create a file in {path.parent} ({exc.strerror}); "
                          "choose a writable path.") from None
    try:
        with open(descriptor, "w", encoding="utf-8") as out:
            yield out
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise FinetuneError(f"{where}: writing the completions failed ({exc.strerror}); "
                            f"{path} is as it was. Free some space or choose another "
                            "path.") from None
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Generate as asked; print (or write) the completions."""
    from transformers import TextStreamer

    from finetune.evaluate import Sampling, generate_text, load_for_inference

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    sampling.check()
    if args.out and not args.prompts:
        raise ConfigError("--out goes with --prompts FILE.jsonl.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be at least 1.")
    if args.prompts is not None:
        prompts = read_prompts(Path(args.prompts))
        target = (replaced_on_success(Path(args.out)) if args.out
                  else contextlib.nullcontext(sys.stdout))
        with target as out:
            _complete(args, prompts, sampling, out)
        if args.out:
            print(f"{len(prompts)} completions written to {args.out}", file=sys.stderr)
        return 0
    loaded = load_for_inference(args.source)
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = not args.no_chat_template
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not args.interactive:
        generate_text(model, tokenizer, args.prompt, sampling, chat=chat, streamer=streamer)
        return 0
    return _chat(model, tokenizer, sampling, chat=chat, streamer=streamer)


def _complete(args: argparse.Namespace, prompts: list, sampling, out: TextIO) -> None:
    """Load the model and write `{"prompt", "completion"}` lines to `out`, a batch at a time."""
    from finetune.evaluate import generate_texts, load_for_inference

    loaded = load_for_inference(args.source)
    batches = generate_texts(loaded.model, loaded.tokenizer, prompts, sampling,
                             chat=not args.no_chat_template, batch_size=args.batch_size)
    done = 0
    for texts in batches:
        for prompt, text in zip(prompts[done:done + len(texts)], texts, strict=True):
            out.write(json.dumps({"prompt": prompt, "completion": text},
                                 ensure_ascii=False) + "\n")
        out.flush()
        done += len(texts)


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
