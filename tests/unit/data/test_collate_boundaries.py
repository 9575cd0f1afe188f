"""No loss across a document boundary: in a packed or flattened row, the position before a
document is the previous document's last token, and it must not be trained to predict the
next document's first token. Each document contributes the targets it has alone."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data.collate import IGNORE_INDEX, Collator

DOCS = [([11, 12, 13, 14], [True] * 4), ([21, 22, 23], [True] * 3),
        ([31, 32, 33, 34, 35], [False, False, True, True, True])]


def _targets(batch: dict) -> int:
    """Positions whose next token is trained, as the causal loss counts them."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("isolation", ["varlen", "block_mask_4d", "flex_block_mask"])
def test_a_packed_row_trains_each_document_as_alone(isolation: str) -> None:
    if isolation == "flex_block_mask":
        pytest.importorskip("torch.nn.attention.flex_attention")
    packed = Collator(pad_id=0, isolation=isolation)([DOCS])
    alone = [Collator(pad_id=0, isolation=None)([[doc]]) for doc in DOCS]
    assert _targets(packed) == sum(_targets(batch) for batch in alone) == 3 + 2 + 3
    labels = packed["labels"][0].numpy()
    starts = np.cumsum([0] + [len(ids) for ids, _ in DOCS[:-1]])
    assert all(labels[s] == IGNORE_INDEX for s in starts)  # 21 is not predicted from 14
    assert labels[1:4].tolist() == [12, 13, 14] and labels[5:7].tolist() == [22, 23]
