"""Packed rows under flex_attention: each document's logits equal the document run alone (the
flex block mask keeps packed documents apart). The same comparison for sdpa and eager, and the
naive mask that must fail it, are in tests/unit/data/test_data_packing.py; this case lives here
because compiling flex_attention on the CPU takes tens of seconds."""

from __future__ import annotations

import pytest
import torch

# The unit tests' fixtures (the tiny tokenizer, its two-layer model, the real pipeline's packed
# rows) and comparison, so both layers check isolation the same way.
from tests.unit.data.conftest import alpaca_rows, data_cfg, jsonl, tokenizer  # noqa: F401
from tests.unit.data.test_data_packing import (  # noqa: F401
    ATOL,
    _max_doc_error,
    _one_thread,
    model,
    packed,
)

pytestmark = pytest.mark.slow


def test_flex_block_mask_isolates(model, packed):  # noqa: F811
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():  # any other failure of the forward is a failure
        pytest.skip(f"torch {torch.__version__} has no flex_attention")
    batch, rows = packed("flex_attention")
    try:
        model.set_attn_implementation("flex_attention")
        with torch.no_grad():
            error = _max_doc_error(model, batch, rows)
    finally:
        model.set_attn_implementation("sdpa")
    assert error < ATOL
