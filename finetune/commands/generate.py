"""`finetune generate MODEL_OR_RUN --prompt TEXT`: sample from a model or a fine-tuned run."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `generate`'s arguments."""
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="a run dir, checkpoint dir, adapter folder, model or tiny")
    parser.add_argument("--prompt", required=True, metavar="TEXT")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt as raw text")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Print the sampled continuation of the prompt."""
    import torch

    from finetune.adapters.export import load_trained_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_trained_model(args.source)
    model.eval()
    if tokenizer.chat_template and not args.no_chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None,
                             top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
