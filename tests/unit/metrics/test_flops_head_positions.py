"""MFU counts the LM head only where it runs: with `logits_to_keep` (the SFT loss asks for the
logits of trained positions only), at those positions in every row, checked against torch's
FlopCounterMode running the real loss."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.flops import (
    FlopCounter,
    TrainingMode,
    attention_flops,
    head_flops,
    loss_head_positions,
    step_flops,
)
from finetune.train.loss import causal_lm_loss

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(**SMALL), attn_implementation="eager")


def _batch() -> dict:
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt of 5 tokens: logits needed at positions 4, 5, 6 only
    return {"input_ids": ids, "labels": labels}


def test_sft_loss_runs_the_head_at_the_trained_positions_only(model) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    batch = _batch()
    assert loss_head_positions(batch) == 2 * 3
    with FlopCounterMode(display=False) as counter:
        causal_lm_loss(model, batch, torch.tensor(6.0)).backward()
    mode = TrainingMode(full=True)
    counted = FlopCounter(model.config, mode, head_at_loss_positions=True).step([batch])
    # eager attention computes the whole 8 x 8 square, the count the causal triangle
    masked = attention_flops(model.config, [1]) * 2 * (64 - 36)
    assert counter.get_total_flops() == counted + masked
    assert counted == step_flops(model.config, mode, [8, 8], head_positions=6)
    # Counting the head at all 16 tokens overstates this step by 10 head positions.
    everywhere = FlopCounter(model.config, mode).step([batch])
    assert everywhere - counted == 10 * head_flops(model.config, mode) > 0.3 * counted


def test_collated_loss_positions_are_used_when_given() -> None:
    batch = _batch()
    batch["loss_positions"] = torch.tensor([4, 5, 6])
    assert loss_head_positions(batch) == 6


def test_the_run_counts_kept_positions_for_the_sft_loss_only(model) -> None:
    from finetune.metrics.monitor import _head_at_loss_positions

    assert _head_at_loss_positions("lora_sft", model)
    assert not _head_at_loss_positions("dpo", model)  # scores whole sequences
