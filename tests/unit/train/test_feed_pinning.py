"""Batches are pinned for the accelerators whose copies run asynchronously from pinned memory
(CUDA, ROCm, XPU), as the feed promises, and not for the CPU or MPS."""

from __future__ import annotations

import pytest
import torch

from finetune.train.feed import pins_batches


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cuda:1", True), ("xpu", True),
                                                ("xpu:0", True), ("cpu", False), ("mps", False)])
def test_pinned_per_device(device: str, pinned: bool) -> None:
    assert pins_batches(torch.device(device)) is pinned

