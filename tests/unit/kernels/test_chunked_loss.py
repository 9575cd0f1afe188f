"""The chunked linear cross-entropy equals the unfused path, and never holds the whole logits."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.kernels.chunked_loss import (
    ChunkedLossHead,
    chunk_rows,
    chunked_head_of,
    install_chunked_head,
    linear_cross_entropy,
    linear_token_logps,
)
from finetune.train.recipe import RECIPE_PACKAGE

IGNORE = -100


def _inputs(n: int = 150, h: int = 24, v: int = 700, *, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.3
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::6] = IGNORE
    targets[40:60] = IGNORE  # a chunk (rows=16) with no trained position at all
    return hidden, weight, b, targets


def _leaves(*tensors, grad=(True, True, True)):
    pairs = zip(tensors, grad[:len(tensors)], strict=True)
    return [None if t is None else t.clone().requires_grad_(g) for t, g in pairs]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("rows", [16, 7, None])
def test_fp32_loss_and_grads_equal_the_unfused_path(rows) -> None:
    hidden, weight, bias, targets = _inputs()
    h1, w1, b1 = _leaves(hidden, weight, bias)
    loss = linear_cross_entropy(h1, w1, targets, bias=b1, ignore_index=IGNORE, rows=rows)
    (loss / 37.0).backward()
    h2, w2, b2 = _leaves(hidden, weight, bias)
    want = F.cross_entropy(F.linear(h2, w2, b2).float(), targets, ignore_index=IGNORE,
                           reduction="sum")
    (want / 37.0).backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    for got, ref in ((h1, h2), (w1, w2), (b1, b2)):
        assert _rel(got.grad, ref.grad) <= 1e-5
    assert h1.grad[40:60].abs().max() == 0  # ignored positions get no gradient


def test_frozen_head_gets_no_gradient_and_hidden_grads_still_match() -> None:
    hidden, weight, _, targets = _inputs(bias=False)
    h1, w1 = _leaves(hidden, weight, grad=(True, False))
    linear_cross_entropy(h1, w1, targets, ignore_index=IGNORE, rows=16).backward()
    h2, w2 = _leaves(hidden, weight, grad=(True, False))
    F.cross_entropy(F.linear(h2, w2).float(), targets, ignore_index=IGNORE,
                    reduction="sum").backward()
    assert w1.grad is None
    assert _rel(h1.grad, h2.grad) <= 1e-5


def test_bf16_autocast_matches_the_unfused_path_within_bf16_rounding() -> None:
    hidden, weight, _, targets = _inputs(bias=False)
    weight = weight.to(torch.bfloat16)  # a frozen bf16 base head, as LoRA runs load it
    h1, w1 = _leaves(hidden, weight, grad=(True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h1, w1, targets, ignore_index=IGNORE, rows=16)
    loss.backward()
    h2, w2 = _leaves(hidden, weight, grad=(True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h2, w2).float(), targets, ignore_index=IGNORE,
                               reduction="sum")
    want.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-3 * abs(want.item())
    assert h1.grad.dtype == h2.grad.dtype
    assert _rel(h1.grad, h2.grad) <= 2e-2


@pytest.mark.parametrize("trainable_head", [False, True])
def test_token_logps_and_their_grads_equal_log_softmax(trainable_head: bool) -> None:
    hidden, weight, bias, targets = _inputs()
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    grad = (True, trainable_head, trainable_head)
    h1, w1, b1 = _leaves(hidden, weight, bias, grad=grad)
    logps = linear_token_logps(h1, w1, targets, bias=b1, ignore_index=IGNORE, rows=16)
    (logps * upstream).sum().backward()
    h2, w2, b2 = _leaves(hidden, weight, bias, grad=grad)
    valid = targets != IGNORE
    full = torch.log_softmax(F.linear(h2, w2, b2).float(), dim=-1)
    want = full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    (want * upstream).sum().backward()
    assert _rel(logps, want) <= 1e-5
    assert logps[~valid].abs().max() == 0
    assert _rel(h1.grad, h2.grad) <= 1e-5
    if trainable_head:
        assert _rel(w1.grad, w2.grad) <= 1e-5
        assert _rel(b1.grad, b2.grad) <= 1e-5
    else:
        assert w1.grad is None


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_as_large_as_the_whole_logits_is_ever_created() -> None:
    n, h, v = 2048, 8, 32_000
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    with _LargestOutput() as seen:
        linear_cross_entropy(hidden, weight, targets).backward()
    assert chunk_rows(v) < n  # the default chunking splits these positions
    assert seen.largest <= chunk_rows(v) * v < n * v // 2
    assert hidden.grad is not None and weight.grad is not None


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


def _batch(rows: int = 3, seq: int = 12):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # prompts
    labels[1, 9:] = IGNORE  # a shorter answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_training_loss_through_the_chunked_head_equals_the_unfused_one() -> None:
    from finetune.train.loss import causal_lm_loss

    batch, items = _batch(), torch.tensor(17.0)
    plain = _tiny_llama()
    want = causal_lm_loss(plain, batch, items)
    want.backward()
    chunked = _tiny_llama()
    assert install_chunked_head(chunked)[0]
    assert isinstance(chunked.lm_head, ChunkedLossHead)
    assert list(chunked.state_dict()) == list(plain.state_dict())
    got = causal_lm_loss(chunked, batch, items)
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    grads = dict(chunked.named_parameters())
    for name, p in plain.named_parameters():
        assert _rel(grads[name].grad, p.grad) <= 1e-5, name
    # Outside a loss request the head is the plain linear layer (generation, eval logits).
    ids = batch["input_ids"]
    assert torch.equal(chunked(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_dpo_sequence_logps_through_the_chunked_head_equal_the_unfused_ones() -> None:
    sequence_logps = importlib.import_module(f"{RECIPE_PACKAGE}.dpo").sequence_logps

    batch = _batch(rows=4)
    plain = _tiny_llama()
    want, want_counts = sequence_logps(plain, batch)
    chunked = _tiny_llama()
    install_chunked_head(chunked)
    got, counts = sequence_logps(chunked, batch)
    assert torch.equal(counts, want_counts)
    assert _rel(got, want) <= 1e-5
    got.sum().backward()
    want.sum().backward()
    grads = dict(chunked.named_parameters())
    for name, p in plain.named_parameters():
        assert _rel(grads[name].grad, p.grad) <= 1e-5, name


def test_a_model_that_rescales_its_logits_keeps_the_unfused_head() -> None:
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    installed, why = install_chunked_head(model)
    assert not installed and "final_logit_softcapping" in why
    assert chunked_head_of(model) is None


def test_under_autocast_the_logits_are_in_the_autocast_dtype_like_the_unfused_path() -> None:
    # fp32 inputs under bf16 autocast: the unfused head's matmul runs in bf16, and so must the
    # chunked one's (its label log-probabilities then agree to fp32 rounding; computed in fp32
    # they are off by about 1e-2).
    hidden, weight, _, targets = _inputs(bias=False)
    valid = targets != IGNORE

    def unfused() -> torch.Tensor:
        full = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
        return full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_logps(hidden, weight, targets, ignore_index=IGNORE, rows=16)
        want = unfused()
    assert (got - want).abs().max() <= 1e-4
    assert (unfused() - want).abs().max() > 1e-3  # the test tells bf16 from fp32 logits


def test_a_chunk_is_as_many_positions_as_fp32_logits_fit_the_budget() -> None:
    # 64 MiB of 4-byte logits over a 32,000 vocabulary: 67,108,864 // 128,000 = 524 positions.
    assert chunk_rows(32_000) == 524
    assert chunk_rows(128_256, budget=4 * 128_256 * 3 + 5) == 3
    assert chunk_rows(10**9) == 1  # a vocabulary larger than the budget: one position
