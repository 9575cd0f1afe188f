"""Gradient accumulation: the loss is normalised by the window's trained tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.train.loss import (
    IGNORE_INDEX,
    LossOutput,
    accumulate_gradients,
    causal_lm_loss,
    trained_tokens,
)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _batches() -> list[dict]:
    """8 rows of very different lengths and prompt masks, right-padded to 24."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in [(24, 3), (5, 2), (17, 10), (9, 1), (3, 1), (20, 15), (12, 4), (7, 6)]:
        ids = torch.randint(1, 97, (length,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        pad = 24 - length
        rows.append({
            "input_ids": torch.cat([ids, torch.zeros(pad, dtype=torch.long)]),
            "labels": torch.cat([labels, torch.full((pad,), IGNORE_INDEX)]),
            "attention_mask": torch.cat([torch.ones(length, dtype=torch.long),
                                         torch.zeros(pad, dtype=torch.long)]),
        })
    return rows


def _collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _grads(micro_batch_size: int, *, per_micro_mean: bool = False) -> dict[str, torch.Tensor]:
    model = _model()
    rows = _batches()
    micro = [_collate(rows[i:i + micro_batch_size]) for i in range(0, 8, micro_batch_size)]
    if per_micro_mean:  # the peers' bug: mean per micro-batch, then averaged over micro-batches
        for batch in micro:
            loss = causal_lm_loss(model, batch, torch.tensor(float(trained_tokens(batch))))
            (loss / len(micro)).backward()
    else:
        window = sum(trained_tokens(b) for b in micro)
        accumulate_gradients(model, micro, causal_lm_loss, window_tokens=window,
                             backward=lambda loss: loss.backward())
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_one_by_eight_equals_four_by_two() -> None:
    big = _grads(8)
    small = _grads(2)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_micro_batch_mean_would_differ() -> None:
    """The comparison above can fail: the naive normalisation gives other gradients."""
    big = _grads(8)
    naive = _grads(2, per_micro_mean=True)
    diff = max(float((naive[n] - big[n]).abs().max()) for n in big)
    assert diff > 1e-3


def test_window_loss_is_token_mean() -> None:
    model = _model()
    rows = _batches()
    micro = [_collate(rows[i:i + 2]) for i in range(0, 8, 2)]
    window = sum(trained_tokens(b) for b in micro)
    loss_sum = accumulate_gradients(model, micro, causal_lm_loss, window_tokens=window,
                                    backward=lambda loss: loss.backward()).loss_sum.item()
    full = _collate(rows)
    with torch.no_grad():
        expected = float(model(**{k: v for k, v in full.items() if k != "labels"},
                               labels=full["labels"]).loss)
    assert loss_sum / window == pytest.approx(expected, rel=1e-5)


def test_loss_output_metrics_sum_to_the_window_mean() -> None:
    """A recipe's extra metrics, normalised like the loss, add up to the window mean."""
    model = _model()
    rows = _batches()
    micro = [_collate(rows[i:i + 2]) for i in range(0, 8, 2)]
    window = sum(trained_tokens(b) for b in micro)

    def loss_with_metric(model, batch, num_items):
        loss = causal_lm_loss(model, batch, num_items)
        return LossOutput(loss, {"trained_share": trained_tokens(batch) / num_items})

    out = accumulate_gradients(model, micro, loss_with_metric, window_tokens=window,
                               backward=lambda loss: loss.backward())
    assert {k: v.item() for k, v in out.metrics.items()} == {"trained_share": pytest.approx(1.0)}
    assert out.loss_sum.item() > 0
