"""`sdpa_varlen`: SDPA once per document of a padding-free row, and the CPU precision rule.

Each document of a flattened row must come out exactly as if it ran alone (forward and
gradients), documents must never see each other, and the calls that are not training rows
(generation with a cache, left-padded prompts) must match transformers' own sdpa.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import plan
from finetune.kernels.attention import ATTENTION, varlen_forward
from finetune.kernels.registry import KernelOverrideError
from finetune.kernels.sdpa import sdpa_forward
from finetune.kernels.varlen_sdpa import (
    VARLEN_SDPA,
    causal_padding_mask,
    document_lengths,
    register_varlen_sdpa,
    varlen_sdpa_attention,
)


class _Module(torch.nn.Module):
    is_causal = True


def _attend(q, k, v, positions):
    out, _ = varlen_sdpa_attention(_Module(), q, k, v, None, scaling=0.25, position_ids=positions)
    return out


def test_each_document_equals_itself_alone_and_never_sees_the_others() -> None:
    torch.manual_seed(0)
    lengths = [5, 11, 1, 7]
    n = sum(lengths)
    q = torch.randn(1, 4, n, 16, requires_grad=True)
    k = torch.randn(1, 2, n, 16, requires_grad=True)
    v = torch.randn(1, 2, n, 16, requires_grad=True)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    out = _attend(q, k, v, positions)  # (1, n, h, d)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    start = 0
    for length in lengths:
        part = [t.detach()[:, :, start:start + length].clone().requires_grad_() for t in (q, k, v)]
        alone = sdpa_forward(*part, 0.25).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + length], alone, rtol=0, atol=1e-6)
        alone.square().sum().backward()
        for grad, piece in zip(grads, part, strict=True):
            torch.testing.assert_close(grad[:, :, start:start + length], piece.grad, rtol=0,
                                       atol=1e-5)
        start += length
    # One causal row over all of them (what a leak would be) differs after the first document.
    leaking = sdpa_forward(q.detach(), k.detach(), v.detach(), 0.25).transpose(1, 2)
    assert (leaking[:, lengths[0]:] - out.detach()[:, lengths[0]:]).abs().max() > 0.1


def test_document_lengths_only_for_one_row_that_starts_a_document() -> None:
    assert document_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6) == [3, 2, 1]
    assert document_lengths(torch.arange(4)[None], 4) == [4]
    assert document_lengths(None, 4) is None
    assert document_lengths(torch.tensor([[3, 4, 5]]), 3) is None  # a continuation
    assert document_lengths(torch.arange(4).repeat(2, 1), 4) is None  # padded rows


def test_an_in_place_change_of_the_cached_row_is_read_again() -> None:
    from finetune.kernels.varlen_sdpa import _LengthsOfLastRow

    lengths_of = _LengthsOfLastRow()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert lengths_of(positions, 6) == [3, 2, 1]
    positions[0, 3:] = torch.tensor([3, 4, 5])
    assert lengths_of(positions, 6) == [6]
    positions[0, 2] = 0
    assert lengths_of(positions, 6) == [2, 4]


def test_lengths_are_read_once_per_row_not_once_per_layer(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer gets the same position_ids: the lengths are read from it once (a device
    sync on a GPU); a changed or new tensor, even with equal values, is read again."""
    import finetune.kernels.varlen_sdpa as varlen

    reads = []
    original = varlen.document_lengths
    monkeypatch.setattr(varlen, "document_lengths",
                        lambda *a: reads.append(1) or original(*a))
    model = _tiny(tiny_model_dir, VARLEN_SDPA)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        first = model(input_ids=ids, position_ids=positions).logits
        assert len(reads) == 1 and model.config.num_hidden_layers > 1
        model(input_ids=ids, position_ids=positions)
        assert len(reads) == 1  # the same tensor, unchanged
        model(input_ids=ids, position_ids=positions.clone())
        assert len(reads) == 2  # equal values, another tensor
        model(input_ids=ids, position_ids=positions)
        assert len(reads) == 3  # the first tensor again: the cached row is now `positions`
        positions[0, 4:] = torch.arange(8)  # in place, the very tensor cached: two documents
        merged = model(input_ids=ids, position_ids=positions).logits
        assert len(reads) == 4
    # The third document now continues the second: its tokens see the second's.
    assert not torch.allclose(merged[0, 7:], first[0, 7:], atol=1e-4)
    torch.testing.assert_close(merged[0, :7], first[0, :7])


def test_masks_never_leave_a_query_without_a_key() -> None:
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = causal_padding_mask(padding, 5, 5, torch.device("cpu"))
    assert mask.shape == (2, 1, 5, 5) and bool(mask.any(dim=-1).all())
    assert not bool(mask[0, 0, 4, 0]) and bool(mask[0, 0, 4, 2])  # padding keys are masked
    assert not bool(mask[1, 0, 1, 2])  # and future ones
    # Decoding 2 new tokens after 3 cached: the queries are the last two positions.
    step = causal_padding_mask(None, 2, 5, torch.device("cpu"))
    assert step[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]


def test_self_check_forward_equals_sdpa_on_whole_rows() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 8, 24, 16), torch.randn(3, 4, 24, 16), torch.randn(3, 4, 24, 16)
    torch.testing.assert_close(varlen_forward(q, k, v, 0.25), sdpa_forward(q, k, v, 0.25),
                               rtol=0, atol=1e-6)


def _tiny(tiny_model_dir: Path, attention: str):
    from transformers import AutoModelForCausalLM

    register_varlen_sdpa()
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention,
                                                dtype=torch.float32).eval()


def test_generation_with_left_padding_matches_transformers_sdpa(tiny_model_dir: Path) -> None:
    ids = torch.tensor([[0, 0, 0, 17, 45, 99], [23, 5, 81, 17, 45, 99]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    found = {}
    for attention in ("sdpa", VARLEN_SDPA):
        model = _tiny(tiny_model_dir, attention)
        torch.manual_seed(0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)
        found[attention] = (logits, tokens)
    torch.testing.assert_close(found[VARLEN_SDPA][0][mask.bool()], found["sdpa"][0][mask.bool()],
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(found[VARLEN_SDPA][1], found["sdpa"][1])


def test_padding_free_row_gives_the_loss_and_gradients_of_padded_rows(tiny_model_dir: Path) -> None:
    """The same three examples, padded [3, 9] with sdpa and flattened [1, 20] with
    sdpa_varlen: one loss, one set of LoRA-free weight gradients."""
    from finetune.data.collate import Collator

    docs = [(torch.arange(3, 12).numpy(), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]).numpy()),
            (torch.arange(40, 44).numpy(), torch.tensor([0, 1, 1, 1]).numpy()),
            (torch.arange(70, 77).numpy(), torch.tensor([0, 0, 1, 1, 1, 1, 1]).numpy())]
    results = {}
    for attention, isolation in (("sdpa", None), (VARLEN_SDPA, "varlen")):
        batch = Collator(pad_id=0, isolation=isolation)([[doc] for doc in docs])
        model = _tiny(tiny_model_dir, attention).train()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results[attention] = (batch["input_ids"].shape, loss.detach(),
                              model.model.layers[0].self_attn.q_proj.weight.grad)
    assert results["sdpa"][0] == (3, 9) and results[VARLEN_SDPA][0] == (1, 20)
    torch.testing.assert_close(results[VARLEN_SDPA][1], results["sdpa"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[VARLEN_SDPA][2], results["sdpa"][2], rtol=1e-4, atol=1e-6)


def test_cpu_plans_pick_it_and_isolate_packed_documents_with_varlen() -> None:
    kernel_plan = plan(profile_by_name("cpu"), KernelsConfig(), packing=True)
    assert kernel_plan.choice("attention") == VARLEN_SDPA
    assert kernel_plan.packing_isolation == "varlen"
    assert ATTENTION.get(VARLEN_SDPA).transformers_name == VARLEN_SDPA
    # Elsewhere it is only taken by name: GPUs keep their fused kernels.
    assert plan(profile_by_name("a100"), KernelsConfig()).choice("attention") == "sdpa"
    forced = plan(profile_by_name("a100"), KernelsConfig(attention=VARLEN_SDPA))
    assert forced.choice("attention") == VARLEN_SDPA


@pytest.mark.parametrize(("name", "precision"), [("cpu", "fp32"), ("cpu-amx", "bf16"),
                                                 ("cpu-avx512bf16", "fp32")])
def test_cpu_bf16_leads_only_with_amx(name: str, precision: str) -> None:
    kernel_plan = plan(profile_by_name(name), KernelsConfig())
    assert kernel_plan.choice("precision") == precision
    if name == "cpu-avx512bf16":
        assert "AVX512-BF16 but no AMX" in kernel_plan.kernels["precision"].reason
        # Still there for memory when asked for by name.
        forced = plan(profile_by_name(name), KernelsConfig(precision="bf16"))
        assert forced.choice("precision") == "bf16"
    if name == "cpu":
        with pytest.raises(KernelOverrideError, match="AMX-BF16 or AVX512-BF16"):
            plan(profile_by_name(name), KernelsConfig(precision="bf16"))


def test_a_sliding_window_is_honoured_inside_each_document() -> None:
    """Mistral/Qwen2-style sliding_window: a query sees fewer than `window` positions back,
    within its own document, as transformers' eager attention with its sliding mask does."""
    torch.manual_seed(2)
    lengths, window = [9, 4], 3
    n = sum(lengths)
    q, k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    out, _ = varlen_sdpa_attention(_Module(), q, k, v, None, scaling=0.5,
                                   position_ids=positions, sliding_window=window)
    start = 0
    for length in lengths:
        qs, ks, vs = (t[:, :, start:start + length] for t in (q, k, v))
        i = torch.arange(length)
        allowed = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
        scores = (qs @ ks.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf"))
        expected = (scores.softmax(-1) @ vs).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + length], expected, rtol=1e-5, atol=1e-6)
        start += length


def test_soft_capping_is_refused_not_ignored() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="kernels.attention=eager"):
        varlen_sdpa_attention(_Module(), q, q, q, None, softcap=30.0)
