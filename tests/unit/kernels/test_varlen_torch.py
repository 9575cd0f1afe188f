"""`varlen_attn`: torch's in-tree varlen attention behind transformers' attention interface.

torch's kernel is CUDA-only, so on the CPU it cannot run: the self-check must fail there (the
plan can never pick it on a CPU), and the code around the kernel (flattening, cu_seqlens, GQA,
scale and window arguments for each torch signature, the SDPA route for other calls) is tested
against a CPU stand-in with the kernel's contract: causal attention within each cu_seqlens
segment. The kernel itself is checked where it runs, by the self-check on the GPU.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.kernels import ModelFacts, varlen_torch
from finetune.kernels.attention import ATTENTION
from finetune.kernels.sdpa import sdpa_forward
from finetune.kernels.selfcheck import check_attention
from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa
from finetune.kernels.varlen_torch import (
    VARLEN_ATTN,
    register_varlen_attn,
    varlen_attn_forward,
    varlen_call,
)

FACTS = ModelFacts(num_heads=4, num_kv_heads=2, head_dim=16, dtype="fp32")


def _segments(q, k, v, cu_seq, attend):
    out = torch.empty_like(q)
    bounds = cu_seq.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # (T, H, D) slices -> (1, H, t, D)
        part = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        out[start:end] = attend(*part)[0].transpose(0, 1)
    return out


def new_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
               num_splits=None):
    """The contract of torch 2.12+'s varlen_attn, on the CPU."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and window_size[1] == 0
    assert k.shape[1] == q.shape[1] or enable_gqa

    def attend(q1, k1, v1):
        n = q1.shape[2]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window_size[0] >= 0:
            allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-window_size[0] - 1)
        return F.scaled_dot_product_attention(q1, k1, v1, attn_mask=allowed, scale=scale,
                                              enable_gqa=enable_gqa)

    return _segments(q, k, v, cu_q, attend)


def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """The contract of torch 2.10's varlen_attn: no scale, no GQA, no window."""
    assert k.shape[1] == q.shape[1], "torch 2.10 varlen_attn takes no GQA"
    return _segments(q, k, v, cu_q,
                     lambda q1, k1, v1: F.scaled_dot_product_attention(q1, k1, v1,
                                                                       is_causal=is_causal))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch):
    def use(fn):
        monkeypatch.setattr(varlen_torch, "torch_varlen_attn", lambda: fn)
    return use


def test_torch_kernel_does_not_run_on_the_cpu_so_the_self_check_refuses_it() -> None:
    failure = check_attention(ATTENTION.get(VARLEN_ATTN), replace(FACTS, dtype="bf16"), "cpu")
    assert failure is not None and failure.startswith(f"{VARLEN_ATTN} raised")


@pytest.mark.parametrize("fn", [new_varlen, old_varlen], ids=["torch>=2.12", "torch2.10"])
def test_rows_as_documents_equal_causal_sdpa_per_row(stand_in, fn) -> None:
    stand_in(fn)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 10, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    scale = 16 ** -0.5
    torch.testing.assert_close(varlen_attn_forward(q, k, v, scale), sdpa_forward(q, k, v, scale),
                               rtol=0, atol=1e-6)
    # ... and the self-check passes it (the same check the GPU runs on torch's kernel).
    assert check_attention(ATTENTION.get(VARLEN_ATTN), FACTS, "cpu") is None


def test_a_torch_without_scale_refuses_another_scale_instead_of_ignoring_it() -> None:
    q, k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="takes no scale.*sdpa_varlen"):
        varlen_call(q, k, v, cu, 6, 0.5, fn=old_varlen)
    with pytest.raises(ValueError, match="sliding window.*sdpa_varlen"):
        varlen_call(q, k, v, cu, 6, None, window=3, fn=old_varlen)


def test_sliding_window_stays_inside_each_document() -> None:
    torch.manual_seed(1)
    lengths, window = [9, 4], 3
    q, k, v = torch.randn(13, 2, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32)
    out = varlen_call(q, k, v, cu, 9, 0.5, window=window, fn=new_varlen)
    start = 0
    for n in lengths:
        rows = torch.arange(n)[:, None]
        allowed = (rows >= torch.arange(n)) & (rows - torch.arange(n) < window)
        part = [x[start:start + n].transpose(0, 1)[None] for x in (q, k, v)]
        want = F.scaled_dot_product_attention(*part, attn_mask=allowed, scale=0.5)[0]
        torch.testing.assert_close(out[start:start + n], want.transpose(0, 1), rtol=0, atol=1e-6)
        start += n


def _tiny(tiny_model_dir: Path, attention: str):
    from transformers import AutoModelForCausalLM

    register_varlen_sdpa()
    register_varlen_attn()
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention,
                                                dtype=torch.float32).eval()


def test_packed_row_gives_each_document_its_logits_alone(tiny_model_dir: Path, stand_in) -> None:
    """The leak test of varlen_attn: documents flattened into one row by the collator, with the
    boundaries read from position_ids, or given as cu_seq_lens_q/max_length_q."""
    from finetune.data.collate import Collator

    stand_in(new_varlen)
    model = _tiny(tiny_model_dir, VARLEN_ATTN)
    docs = [(torch.arange(3, 3 + n).numpy(), torch.ones(n, dtype=torch.bool).numpy())
            for n in (7, 12, 5)]
    batch = Collator(pad_id=0, isolation="varlen")([[d] for d in docs])
    assert batch["input_ids"].shape == (1, 24) and "attention_mask" not in batch
    given = {"cu_seq_lens_q": torch.tensor([0, 7, 19, 24]), "max_length_q": 12,
             "cu_seq_lens_k": torch.tensor([0, 7, 19, 24]), "max_length_k": 12}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        from_lengths = model(input_ids=batch["input_ids"], **given).logits
        one_row = model(input_ids=batch["input_ids"]).logits  # what a leak would give
        start = 0
        for ids, _ in docs:
            alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
            end = start + len(ids)
            torch.testing.assert_close(packed[0, start:end], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(from_lengths[0, start:end], alone, rtol=1e-5, atol=1e-5)
            start = end
    assert (one_row[0, 7:] - packed[0, 7:]).abs().max() > 1e-2  # the check can see a leak


def test_other_calls_run_as_sdpa_varlen(tiny_model_dir: Path, stand_in) -> None:
    """Padded batches and generation with a cache never reach the varlen kernel."""
    def never(*args, **kwargs):
        raise AssertionError("the varlen kernel got a call that is not a flattened row")

    stand_in(never)
    ids = torch.tensor([[0, 0, 17, 45, 99], [23, 5, 81, 17, 45]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    found = {}
    for attention in (VARLEN_SDPA, VARLEN_ATTN):
        model = _tiny(tiny_model_dir, attention)
        with torch.no_grad():
            found[attention] = model.generate(input_ids=ids, attention_mask=mask,
                                              max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(found[VARLEN_ATTN], found[VARLEN_SDPA])
