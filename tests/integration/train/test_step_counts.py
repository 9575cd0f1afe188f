"""What a step record counts means the same in every recipe: `trained_tokens` are tokens with a
label, `tokens` the input tokens processed; a preference recipe adds `pairs` (what its loss is
normalised by) instead of passing pairs off as tokens."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.metrics.banner import summary_rows
from finetune.metrics.summary import run_summary

IGNORE = -100


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _recording(trainer) -> list[dict]:
    """Wrap the trainer's loss so each micro-batch's own counts are kept, read off its labels,
    attention mask and pair mask."""
    seen: list[dict] = []
    loss_fn = trainer.loss_fn

    def loss(model, batch, num_items):
        seen.append({"trained": int((batch["labels"][:, 1:] != IGNORE).sum()),
                     "tokens": int(batch["attention_mask"].sum()),
                     "pairs": int(batch["pair_mask"].sum()) if "pair_mask" in batch else None})
        return loss_fn(model, batch, num_items)

    trainer.loss_fn = loss
    return seen


def test_a_dpo_step_counts_its_trained_tokens_and_its_pairs(make_trainer, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=2", "trainer.grad_accum_steps=2",
                           config="dpo")
    seen = _recording(trainer)
    trainer.fit()
    trainer.close()
    records = _records(tmp_path / "run")
    seen = seen[:4]  # the training micro-batches; the end-of-run evaluation follows
    assert len(records) == 2
    for record, window in zip(records, (seen[:2], seen[2:]), strict=True):
        assert record["trained_tokens"] == sum(m["trained"] for m in window)
        assert record["tokens"] == sum(m["tokens"] for m in window)
        assert record["pairs"] == sum(m["pairs"] for m in window) == 4  # 2 x 2 pairs
        assert record["trained_tokens"] > record["pairs"]
    assert trainer.state.tokens_seen == sum(m["trained"] for m in seen)
    assert trainer.state.pairs_seen == 8

    summary = run_summary(trainer.state.to_dict(), [1.0, 0.5], {}, total_steps=2, world_size=1,
                          device=trainer.acc.device, resume_changes=[], forced_changes=[])
    assert summary["tokens_seen"] == trainer.state.tokens_seen
    assert summary["pairs_seen"] == 8
    steps = dict(summary_rows(summary, run_dir=tmp_path / "run", final=tmp_path / "final"))
    assert steps["steps"].startswith(f"2, trained tokens: {trainer.state.tokens_seen}, pairs: 8,")


def test_an_sft_step_counts_trained_tokens_and_no_pairs(make_trainer, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=1", "data.padding_free=off")
    seen = _recording(trainer)
    trainer.fit()
    trainer.close()
    (record,) = _records(tmp_path / "run")
    assert record["trained_tokens"] == seen[0]["trained"]  # then the end-of-run evaluation
    assert "pairs" not in record and trainer.state.pairs_seen == 0
