"""causal_lm_loss computes the vocabulary projection only where a trained token is predicted,
and gives the loss and gradients of the model's own loss path."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data.collate import Collator
from finetune.train.loss import causal_lm_loss, selects_logits


def _model(tiny_model_dir: Path, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from finetune.kernels.varlen_sdpa import register_varlen_sdpa

    register_varlen_sdpa()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention,
                                                dtype=torch.float32)


def _docs():
    rng = np.random.default_rng(0)
    found = []
    for n, prompt in ((12, 7), (5, 2), (9, 9)):  # the last has no trained token
        ids = rng.integers(10, 1000, n)
        found.append((ids, np.arange(n) >= prompt))
    return found


@pytest.mark.parametrize(("attention", "isolation"), [("sdpa", None), ("sdpa_varlen", "varlen")])
def test_loss_and_gradients_equal_the_models_own_and_the_head_sees_only_trained_positions(
        tiny_model_dir: Path, attention: str, isolation: str | None) -> None:
    model = _model(tiny_model_dir, attention)
    batch = Collator(pad_id=0, isolation=isolation)([[d] for d in _docs()])
    num_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()))
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    loss = causal_lm_loss(model, batch, num_items)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    own = model(**batch, num_items_in_batch=num_items, use_cache=False).loss
    own.backward()
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-6)
    for grad, param in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-6)
    targets = batch["labels"][:, 1:] != -100
    kept = int(targets.any(dim=0).sum())  # positions with a target in some row
    assert seen[0] == (batch["input_ids"].shape[0], kept)
    assert kept < batch["input_ids"].shape[1] - 1  # prompts and padding were skipped


def test_a_replaced_forward_keeps_the_models_own_loss_path(tiny_model_dir: Path) -> None:
    """Liger's fused linear cross-entropy replaces the model's forward and never builds
    logits: such a model gets labels, not logits_to_keep."""
    model = _model(tiny_model_dir)
    assert selects_logits(model)
    patched = _model(tiny_model_dir)
    calls = []
    original = type(patched).forward

    def fused(self, *args, **kwargs):
        calls.append(sorted(kwargs))
        return original(self, *args, **kwargs)

    patched.forward = types.MethodType(fused, patched)
    assert not selects_logits(patched)
    batch = Collator(pad_id=0, isolation=None)([[d] for d in _docs()])
    causal_lm_loss(patched, batch, torch.tensor(10.0))
    assert "labels" in calls[0] and "logits_to_keep" not in calls[0]


def test_a_peft_model_is_looked_through(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    assert selects_logits(model)
