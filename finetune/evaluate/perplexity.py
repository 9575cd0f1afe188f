"""Loss and perplexity of a model on collated batches, counted as training counts them.

The batches come from the same data pipeline as training (template, masking, truncation), so
the figure is the training objective: next-token cross-entropy summed over the trained tokens
(labels after the causal shift that are not -100) and divided by their number; perplexity is
its exponential. Logits are taken to fp32 one row at a time, so a large vocabulary costs one
row's logits at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from finetune.data.collate import IGNORE_INDEX


@dataclass
class EvalResult:
    """What `evaluate_loss` measured. `rows`: sequences with a trained token; `tokens`: their
    tokens (padding excluded); `trained_tokens`: the tokens the loss is over; `loss` and
    `perplexity` are None when nothing was trained."""

    rows: int
    tokens: int
    trained_tokens: int
    loss: float | None
    perplexity: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[dict],
                  device: torch.device) -> EvalResult:
    """Mean next-token loss of `model` over the trained tokens of `batches` (see the module)."""
    loss_sum = 0.0
    rows = tokens = trained = 0
    for batch in batches:
        labels = batch["labels"][:, 1:].to(device)
        scored = (labels != IGNORE_INDEX).sum(dim=1)
        if not int(scored.sum()):
            continue
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")
                  if k in batch}
        logits = model(**inputs, use_cache=False).logits
        for row in range(labels.shape[0]):
            loss_sum += float(F.cross_entropy(logits[row, :-1].float(), labels[row],
                                              ignore_index=IGNORE_INDEX, reduction="sum"))
        trained += int(scored.sum())
        for length in scored_document_lengths(batch):
            rows += 1
            tokens += length
    if not trained:
        return EvalResult(rows, tokens, 0, None, None)
    loss = loss_sum / trained
    perplexity = math.exp(loss) if loss < 700 else math.inf
    return EvalResult(rows, tokens, trained, loss, perplexity)


def scored_document_lengths(batch: dict) -> list[int]:
    """The lengths of the examples of a collated CPU batch that have a trained token: padded
    rows are one example each (their 2D mask gives the length); packed and padding-free rows
    hold several, each starting where position_ids restart at 0."""
    labels, mask = batch["labels"], batch.get("attention_mask")
    positions = batch.get("position_ids")
    found = []
    for row in range(labels.shape[0]):
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            spans = [(0, int(mask[row].sum()))]
        elif positions is None:
            spans = [(0, int(labels.shape[1]))]
        else:
            starts = torch.nonzero(positions[row] == 0).flatten().tolist()
            spans = list(zip(starts, [*starts[1:], int(labels.shape[1])], strict=True))
        found += [end - start for start, end in spans
                  if bool((labels[row, start:end] != IGNORE_INDEX).any())]
    return found
