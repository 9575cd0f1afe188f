"""Sampling completions: the prompt as the model saw prompts in training, and generation settings.

A prompt is a user message rendered with the chat template (the run's, when there is one) and
the assistant header after it, or raw text for a model without a chat template. Generation is
greedy at temperature 0; otherwise nucleus sampling at `temperature` and `top_p`, each prompt
drawing from its own generator seeded with the seed, so a prompt gives the same completion under
the same seed whatever came before it or shares its batch. `generate_texts` runs a list of
prompts in left-padded batches, one `generate` call each.

`SampleWriter` is the training-time use: every `eval.generate_every_n_steps` steps it writes the
completions of fixed prompts to samples.jsonl, one JSON object a prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ConfigError

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]  # a user message, or a whole conversation so far


@dataclass(frozen=True)
class Sampling:
    """Generation settings: at most `max_new_tokens`; greedy at temperature 0, else sampled at
    `temperature` from the smallest token set of probability >= `top_p`; `seed` (None: not
    reseeded) is set before each prompt."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    def check(self) -> None:
        """ConfigError naming the option for a value that cannot work."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={self.max_new_tokens} must be at least 1.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature} must be 0 (greedy) or more.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p={self.top_p} must be in (0, 1].")


def prompt_ids(tokenizer: Any, prompt: Prompt, *, chat: bool = True,
               template: str | None = None) -> torch.Tensor:
    """[1, T] input ids of `prompt`: with `chat` and a chat template (`template`, else the
    tokenizer's), the conversation and the assistant header; else the raw text."""
    template = template or tokenizer.chat_template
    if chat and template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, chat_template=template,
                                             add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    if not isinstance(prompt, str):
        raise ConfigError("a conversation needs a chat template: this tokenizer has none; give "
                          "the prompt as text")
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate_text(model: Any, tokenizer: Any, prompt: Prompt, sampling: Sampling, *,
                  chat: bool = True, template: str | None = None, streamer: Any = None,
                  synced: bool = False) -> str:
    """The completion of `prompt` (decoded, special tokens removed). `streamer` (e.g.
    transformers.TextStreamer) receives the tokens as they are generated. `synced`: the model
    is sharded over the processes, which then all keep running forward passes until the
    longest completion is done (transformers' `synced_gpus`)."""
    ids = prompt_ids(tokenizer, prompt, chat=chat, template=template)[0]
    return _generate_rows(model, tokenizer, [ids], sampling, streamer=streamer, synced=synced)[0]


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], sampling: Sampling,
                   *, chat: bool = True, template: str | None = None, batch_size: int = 8,
                   synced: bool = False) -> Iterator[list[str]]:
    """The completions of `prompts`, in their order, a list per `generate` call of up to
    `batch_size` left-padded prompts. Greedy completions are those of `generate_text` one
    prompt at a time; a sampled one depends on its prompt and `sampling.seed` only, not on
    the prompts batched with it (every row draws from its own generator, seeded alike), up to
    the rounding of a padded batch. Every prompt is tokenized before the first batch runs, so
    a prompt that cannot be (ConfigError) stops the call before any generation."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be at least 1.")
    rows = [prompt_ids(tokenizer, prompt, chat=chat, template=template)[0] for prompt in prompts]
    return (_generate_rows(model, tokenizer, rows[start:start + batch_size], sampling,
                           synced=synced)
            for start in range(0, len(rows), batch_size))


class _SeededRows:
    """A logits processor that samples each row's next token (`temperature`, then `top_p`, as
    transformers' own warpers do) from that row's generator, and leaves only that token
    possible, so greedy decoding takes it. A row's draws then never depend on the other rows
    of its batch."""

    def __init__(self, sampling: Sampling, rows: int, device: torch.device) -> None:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        seed = (sampling.seed if sampling.seed is not None
                else int(torch.randint(2**62, ())))  # unseeded: from the global stream
        self.generators = [torch.Generator(device=device).manual_seed(seed)
                           for _ in range(rows)]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        tokens = torch.cat([torch.multinomial(row[None], 1, generator=generator)
                            for row, generator in zip(probs, self.generators, strict=True)])
        return torch.full_like(scores, -torch.inf).scatter_(1, tokens, 0.0)


@torch.no_grad()
def _generate_rows(model: Any, tokenizer: Any, rows: list[torch.Tensor], sampling: Sampling, *,
                   streamer: Any = None, synced: bool = False) -> list[str]:
    """The decoded completions of the prompts `rows` (1D ids), run as one left-padded batch."""
    from transformers import LogitsProcessorList

    if any(len(row) == 0 for row in rows):
        raise ConfigError("a prompt is empty once tokenized: give it some text")
    device = next(model.parameters()).device
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    sample = sampling.temperature > 0
    processors = (LogitsProcessorList([_SeededRows(sampling, len(rows), device)]) if sample
                  else None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=sampling.max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, logits_processor=processors,
                         pad_token_id=pad, eos_token_id=eos, streamer=streamer,
                         synced_gpus=synced)
    stops = set(eos if isinstance(eos, list) else [eos])
    return [tokenizer.decode(_through_first(tail.tolist(), stops), skip_special_tokens=True)
            for tail in out[:, width:]]


def _through_first(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` up to and including the first of `stops`: what follows it in a batch is the
    padding of a row that finished before the others."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


def _rng_kept(device: torch.device):
    """A context that restores the CPU and `device`'s random state on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class SampleWriter:
    """Completions of fixed prompts during training, appended to `path` (samples.jsonl) as
    {"step", "prompt", "completion"} every `every_n_steps` steps.

    Call `maybe_write(step, model, tokenizer)` after each optimizer step on every rank (under
    FSDP every rank takes part in the forward passes); only a writer made with `write=True`
    (rank 0) writes; with `synced=True` (a sharded model) the ranks run their forward passes
    in step. The model is put in eval mode for the generation and restored after, and
    the random number generators are left as they were, so sampling changes nothing in the
    training that follows (resume stays exact).
    """

    def __init__(self, path: Path, prompts: Sequence[str], *, every_n_steps: int,
                 sampling: Sampling, template: str | None = None, write: bool = True,
                 synced: bool = False) -> None:
        self.path, self.prompts, self.every = path, list(prompts), every_n_steps
        self.sampling, self.template, self.write = sampling, template, write
        self.synced = synced

    def due(self, step: int) -> bool:
        return bool(self.every) and bool(self.prompts) and step % self.every == 0

    def maybe_write(self, step: int, model: Any, tokenizer: Any) -> list[dict] | None:
        """The records of `step` when it is due (written on the writing rank), else None."""
        if not self.due(step):
            return None
        was_training = model.training
        model.eval()
        try:
            with _rng_kept(next(model.parameters()).device):
                records = [{"step": step, "prompt": p,
                            "completion": generate_text(model, tokenizer, p, self.sampling,
                                                        template=self.template,
                                                        synced=self.synced)}
                           for p in self.prompts]
        finally:
            model.train(was_training)
        if self.write:
            with self.path.open("a", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            logger.info("step %d: %d sampled completions written to %s", step, len(records),
                        self.path.name)
        return records
