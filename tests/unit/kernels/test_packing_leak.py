"""Every attention that runs on the CPU keeps packed documents apart in the whole model.

For each registered attention whose forward runs here, the tiny Llama runs packed rows collated
for that attention's isolation (dense mask, flex BlockMask or one flattened row), and each
document's logits must equal the document run alone. Attentions that cannot run on a CPU are
named, so a new one cannot slip past without a leak test (varlen_attn's is in
test_varlen_torch.py, against a CPU stand-in for torch's CUDA kernel).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data.collate import Collator
from finetune.kernels import ModelFacts
from finetune.kernels.attention import ATTENTION
from finetune.kernels.selfcheck import check_attention
from finetune.kernels.varlen_sdpa import register_varlen_sdpa
from finetune.kernels.varlen_torch import register_varlen_attn

# Need a GPU kernel or a package this CPU run does not have.
NOT_ON_CPU = {"flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa_cudnn",
              "varlen_attn"}
# flex_attention's whole-model leak test is tests/unit/data/test_data_packing.py (its CPU forward
# is slow uncompiled, ~20 s here).
ELSEWHERE = {"flex_attention"}
FACTS = ModelFacts(num_heads=4, num_kv_heads=2, head_dim=16, dtype="fp32")
ROWS = [[7, 12], [5]]  # document lengths per packed row (the second row is padded)


def _runs_on_cpu(name: str) -> bool:
    return check_attention(ATTENTION.get(name), replace(FACTS), "cpu", backward=False) is None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_cpu_and_gpu_only_attentions_are_all_named() -> None:
    for candidate in ATTENTION:
        assert _runs_on_cpu(candidate.name) is (candidate.name not in NOT_ON_CPU), candidate.name


@pytest.mark.parametrize("name", [c.name for c in ATTENTION
                                  if c.name not in NOT_ON_CPU | ELSEWHERE])
def test_packed_document_logits_equal_the_document_alone(tiny_model_dir: Path,
                                                         name: str) -> None:
    from transformers import AutoModelForCausalLM

    register_varlen_sdpa()
    register_varlen_attn()
    candidate = ATTENTION.get(name)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=candidate.transformers_name,
        dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    rows = [[(rng.integers(3, 200, n), np.ones(n, dtype=bool)) for n in row] for row in ROWS]
    batch = Collator(pad_id=0, isolation=candidate.packing_isolation)(rows)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids",
                                                       "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        flat = logits.shape[0] == 1 and len(rows) > 1  # one flattened row of every document
        at = 0
        for b, row in enumerate(rows):
            at = at if flat else 0
            for ids, _ in row:
                alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
                got = logits[0 if flat else b, at:at + len(ids)]
                torch.testing.assert_close(got, alone, rtol=1e-4, atol=2e-5)
                at += len(ids)
