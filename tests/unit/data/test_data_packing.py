"""Packing: best-fit-decreasing bins, and no attention across packed documents, ever.

The isolation tests run the tiny Llama (random weights, fp32) on packed rows built by the real
pipeline and compare each document's logits (and the loss gradients) with the document run
alone. A naive packed batch (plain all-ones mask) must fail the same comparison, which shows the
test can see a leak.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.data import DataError, build_data, pack_documents, packing_isolation

ATOL = 2e-5


def test_best_fit_decreasing_finds_the_tight_packing():
    rows = pack_documents([5, 4, 3, 3, 2, 2, 1], 10)
    assert len(rows) == 2
    assert sorted(sum([5, 4, 3, 3, 2, 2, 1][d] for d in row) for row in rows) == [10, 10]


def test_packing_places_every_document_once_within_the_limit():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(2000)]
    rows = pack_documents(lengths, 128)
    placed = sorted(d for row in rows for d in row)
    assert placed == list(range(len(lengths)))
    assert max(sum(lengths[d] for d in row) for row in rows) <= 128
    assert len(rows) <= 1.05 * sum(lengths) / 128 + 1  # close to the lower bound
    assert rows == pack_documents(lengths, 128)  # deterministic
    with pytest.raises(DataError, match="does not fit"):
        pack_documents([129], 128)


def test_isolation_per_attention_and_refusal():
    assert packing_isolation("flash_attention_2") == "varlen"
    assert packing_isolation("flash_attention_3") == "varlen"
    assert packing_isolation("sdpa") == packing_isolation("eager") == "block_mask_4d"
    assert packing_isolation("flex_attention") == "flex_block_mask"
    with pytest.raises(DataError, match="cannot keep packed documents apart.*data.packing=false"):
        packing_isolation("paged_attention")
    with pytest.raises(DataError, match="not 'auto'"):
        packing_isolation("auto")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A 2-layer model on ~100 tokens: one thread is faster, and much faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaForCausalLM

    from finetune.models.tiny import tiny_config

    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def packed(tokenizer, data_cfg, jsonl, alpaca_rows):
    """packed(attention) -> (batch, rows of documents) for the first training step."""
    path = jsonl(alpaca_rows(12))

    def make(attention: str):
        cfg = data_cfg(path=str(path), packing=True, max_seq_len=96)
        data = build_data(cfg, tokenizer, attention=attention, seed=0, micro_batch_size=2)
        train = data.train
        rows = [train.documents(train._unit_at(p)) for p in range(2)]
        assert all(len(row) >= 2 for row in rows), "each row should hold several documents"
        return train.batch_at(0), rows

    return make


def _alone(model, ids: np.ndarray) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)[None]
    return model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]


def _max_doc_error(model, batch, rows, **kwargs) -> float:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits
    flat = logits.reshape(-1, logits.shape[-1]) if "attention_mask" not in batch else None
    worst, at = 0.0, 0
    for b, row in enumerate(rows):
        at = at if flat is not None else 0
        for ids, _ in row:
            got = flat[at:at + len(ids)] if flat is not None else logits[b, at:at + len(ids)]
            worst = max(worst, (got - _alone(model, ids)).abs().max().item())
            at += len(ids)
    return worst


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(model, packed, attention):
    model.set_attn_implementation(attention)
    batch, rows = packed(attention)
    assert batch["attention_mask"].shape == (2, 1, 96, 96) or batch["attention_mask"].dim() == 4
    with torch.no_grad():
        assert _max_doc_error(model, batch, rows) < ATOL


def test_naive_packing_leaks_so_the_check_can_fail(model, packed):
    model.set_attn_implementation("sdpa")
    batch, rows = packed("sdpa")
    naive = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with torch.no_grad():
        assert _max_doc_error(model, naive, rows) > 1e-2


def test_varlen_batch_isolates_through_position_ids(model, packed):
    """The flattened flash-attention batch, run through sdpa: transformers derives the document
    boundaries from position_ids (as it derives cu_seqlens for the varlen kernel). For sdpa it
    does so only without a KV cache, hence use_cache=False here; the sdpa path of the pipeline
    itself never relies on this (it passes a 4D mask)."""
    model.set_attn_implementation("sdpa")
    batch, rows = packed("flash_attention_2")
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == sum(len(r) for r in rows)
    with torch.no_grad():
        assert _max_doc_error(model, batch, rows, use_cache=False) < ATOL


def _sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                           labels[..., 1:].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_documents_alone(model, packed, attention):
    model.set_attn_implementation(attention)
    batch, rows = packed(attention)
    params = [p for p in model.parameters()]

    model.zero_grad()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    packed_loss = _sum_loss(logits, batch["labels"])
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in params]

    model.zero_grad()
    alone_loss = torch.zeros(())
    for row in rows:
        for ids, trained in row:
            labels = torch.as_tensor(np.where(trained, ids, -100), dtype=torch.long)
            alone_loss = alone_loss + _sum_loss(_alone(model, ids), labels)
    alone_loss.backward()
    alone_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)
    for got, want in zip(packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
