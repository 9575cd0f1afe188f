"""Packed-row masks built on the device from document ids equal the host-built ones, and only
the [B, T] ids cross to the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.data.collate import Collator, block_diagonal_mask, document_mask, mask_bytes


def _rows() -> list[list[tuple[np.ndarray, np.ndarray]]]:
    def doc(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(1, n + 1), np.ones(n, bool)

    return [[doc(5), doc(3), doc(4)], [doc(7)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_built_mask_equals_the_host_built_one(dtype: torch.dtype) -> None:
    host = Collator(pad_id=0, isolation="block_mask_4d", mask_dtype=dtype)(_rows())
    spans = [[(0, 5), (5, 8), (8, 12)], [(0, 7), (7, 12)]]
    doc_index = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [0] * 7 + [1] * 5])
    built = document_mask(doc_index, dtype)
    assert built.shape == (2, 1, 12, 12) and built.dtype == dtype
    assert torch.equal(built, host["attention_mask"])
    assert torch.equal(built, block_diagonal_mask(spans, 12, dtype))


def test_a_device_collator_builds_the_mask_on_that_device() -> None:
    batch = Collator(pad_id=0, isolation="block_mask_4d", mask_dtype=torch.bfloat16,
                     device="meta")(_rows())
    assert batch["attention_mask"].device.type == "meta"
    assert batch["attention_mask"].shape == (2, 1, 12, 12)
    assert batch["input_ids"].device.type == "cpu"  # the rest moves with the batch


def test_mask_bytes_per_micro_batch() -> None:
    assert mask_bytes("block_mask_4d", 4, 4096, torch.float32) == 256 * 2**20
    assert mask_bytes("block_mask_4d", 4, 4096, torch.bfloat16) == 128 * 2**20
    assert mask_bytes("varlen", 4, 4096, torch.float32) == 0
