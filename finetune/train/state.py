"""The loop's progress: what advances with the steps and must survive a resume.

`Trainer.state_dict()` combines it with the trainable weights, optimizer, scheduler, data
position and RNG into a `finetune.checkpoint.store.TrainerState`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LoopState:
    """Everything that advances with the steps and must survive a resume."""

    step: int = 0
    tokens_seen: int = 0  # trained tokens (with a label), in every recipe
    pairs_seen: int = 0  # preference pairs scored (a pair recipe's loss items); 0 elsewhere
    elapsed_s: float = 0.0
    nan_skipped: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_loss: float | None = None
    # One {"step", "changes"} per resume that changed the config (forced: refused changes
    # accepted with resume_force=true), oldest first: carried by every later checkpoint.
    resume_changes: list[dict[str, Any]] = field(default_factory=list)
    resume_forced_changes: list[dict[str, Any]] = field(default_factory=list)

    def record_resume(self, changes: list[str], forced: list[str]) -> None:
        """Keep this resume's config changes with the step it resumed at."""
        if changes:
            self.resume_changes = [*self.resume_changes,
                                   {"step": self.step, "changes": list(changes)}]
        if forced:
            self.resume_forced_changes = [*self.resume_forced_changes,
                                          {"step": self.step, "changes": list(forced)}]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The fields of `saved` this class knows (older checkpoints lack the eval fields)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
