"""Schema of the `eval` config group: samples written during training."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PROMPTS = ["Write the number in words.\n\n7", "Give the opposite of the word.\n\nhot"]


@dataclass
class EvalConfig:
    """Completions for fixed prompts, written to samples.jsonl while training."""

    generate_every_n_steps: int = 0  # 0: never
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 64
