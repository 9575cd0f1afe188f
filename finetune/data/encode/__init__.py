"""Examples to token ids and trained flags: the `Encoder` contract and its two implementations.

`OffsetEncoder` (offsets.py) is the plain path: the chat template, the HF fast tokenizer with
offset tracking, and the batch assembly (assembly.py) that adds BOS, inserts EOS, truncates and
flags the trained tokens. `FastEncoder` (fast.py) is a drop-in that tests hold equal to it: the
template layout shortcut (layout.py), token spans from byte lengths (token_bytes.py), worker
threads and forked processes (cpus.py, shards.py), and the tokenized-data cache (cache.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from finetune.config.data import DataConfig
from finetune.data.encode.cache import TokenCache, default_cache_dir
from finetune.data.encode.fast import FastEncoder
from finetune.data.encode.offsets import OffsetEncoder
from finetune.data.errors import RowOrigin
from finetune.data.formats import Example
from finetune.data.ingest import SourceTokens
from finetune.data.sources import Source
from finetune.data.tokenized import RowCounts, TokenizedRows


class Encoder(Protocol):
    """Turns (Example, origin) pairs into TokenizedRows under one tokenizer, template and
    data.max_seq_len / truncation / train_on / on_bad_row. A bad row raises a located
    DataError or is counted in `counts` (data.on_bad_row=skip); truncated and dropped rows are
    counted too. Every implementation gives the same rows and counts for the same input."""

    def encode(self, items: list[tuple[Example, RowOrigin]],
               counts: RowCounts) -> TokenizedRows:
        """One batch, in order."""
        ...

    def encode_batches(self, batches: Iterable[list[tuple[Example, RowOrigin]]],
                       counts: RowCounts) -> Iterator[TokenizedRows]:
        """`encode` over each batch, in order."""
        ...

    def encode_source(self, source: Source, cfg: DataConfig, key: str) -> SourceTokens:
        """Every row of `source` in file order, in data.format (detected for auto) with
        data.columns; `key` names these tokens (finetune.data.ingest.source_key)."""
        ...


__all__ = ["Encoder", "FastEncoder", "OffsetEncoder", "TokenCache", "default_cache_dir"]
