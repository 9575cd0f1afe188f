"""Unpacked rows are right-padded, and the attention mask marks exactly the real tokens (the
input-token count behind tokens/s and MFU is read from it); flattened rows carry their document
boundaries computed on the host, so no attention layer reads them back from the device."""

from __future__ import annotations

import numpy as np
import torch

from finetune.data.collate import Collator
from finetune.metrics.flops import document_lengths
from finetune.train.trainer import _input_tokens


def _doc(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(1, n + 1, dtype=np.int64), np.ones(n, bool)


def test_the_mask_covers_each_rows_tokens_and_no_padding() -> None:
    batch = Collator(pad_id=0, isolation=None)([[_doc(3)], [_doc(5)], [_doc(1)]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1],
                                                [1, 0, 0, 0, 0]]
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [-100, -100]
    assert _input_tokens(batch) == 9
    assert document_lengths(batch) == [3, 5, 1]
    assert batch["attention_mask"].dtype == torch.int64


def test_a_flattened_batch_carries_its_document_boundaries() -> None:
    batch = Collator(pad_id=0, isolation="varlen")([[_doc(3), _doc(2)], [_doc(4)]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert batch["document_lengths"] == (3, 2, 4)
    assert "attention_mask" not in batch
