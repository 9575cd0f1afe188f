"""Rows to Examples, and what names a source's tokens.

`source_converter` picks a source's format (detected from its first rows with data.format=auto);
`examples_from` is the lazy row -> Example step every encoder and the streaming reader share.
`source_key` hashes everything that decides a source's tokens (its fingerprint, the tokenizer
and chat template, the settings): it keys the tokenized-data cache and the data fingerprint a
checkpoint is resumed against. `SourceTokens` is what an encoder returns for a whole source.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finetune.config.data import DataConfig
from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import Example, RowConverter, converter_for, detect_format
from finetune.data.sources import Source, SourcePosition, SourceRow
from finetune.data.tokenized import RowCounts, TokenizedRows, reject

DETECT_ROWS = 20
ENCODE_BATCH = 1024
KEY_VERSION = 1  # bump when the same source and settings give other tokens


@dataclass
class SourceTokens:
    """A source's tokenized examples (file order) and what happened to its rows."""

    source: Source
    format: str
    rows: TokenizedRows
    counts: RowCounts
    key: str
    from_cache: bool


def source_converter(source: Source, cfg: DataConfig) -> tuple[str, RowConverter]:
    """The source's format (detected from its first rows when data.format=auto)."""
    columns = dict(cfg.columns or {})
    name = cfg.format
    if name == "auto":
        rows = [row for row, _, _ in itertools.islice(source.rows(), DETECT_ROWS * 5)
                if isinstance(row, dict)][:DETECT_ROWS]
        if not rows:
            raise DataError(f"{source.spec}: no readable rows to detect the format from; check "
                            "the file, or set data.format=NAME")
        name = detect_format(rows, columns, source.spec)
    return name, converter_for(name, columns)


def examples_from(rows: Iterator[SourceRow], converter: RowConverter, counts: RowCounts,
                  on_bad_row: str) -> Iterator[tuple[Example, RowOrigin, SourcePosition]]:
    """Rows to Examples; bad rows raise a located DataError or are counted as skipped."""
    for row, origin, position in rows:
        counts.read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            example = converter(row)
        except BadRow as bad:
            reject(bad, origin, counts, on_bad_row)
            continue
        yield example, origin, position


def batches_of(examples: Iterator[tuple[Example, RowOrigin, SourcePosition]]
               ) -> Iterator[list[tuple[Example, RowOrigin]]]:
    """Lists of ENCODE_BATCH (example, origin) pairs."""
    while True:
        batch = [(example, origin) for example, origin, _ in
                 itertools.islice(examples, ENCODE_BATCH)]
        if not batch:
            return
        yield batch


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """A hash of what makes this tokenizer produce its ids (vocabulary, merges, normalisation,
    special tokens) plus the chat template used."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(type(tokenizer).__name__.encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([special, tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    h.update(template.encode())
    return h.hexdigest()


def settings_material(cfg: DataConfig, tokenizer_hash: str) -> dict[str, Any]:
    """Every setting that changes the tokens of a source (the key, minus the source; not
    data.num_proc, which changes only how fast they are made)."""
    return {"tokenizer": tokenizer_hash, "format": cfg.format,
            "columns": sorted(dict(cfg.columns or {}).items()), "max_seq_len": cfg.max_seq_len,
            "truncation": cfg.truncation, "train_on": cfg.train_on, "on_bad_row": cfg.on_bad_row}


def source_key(source: Source, cfg: DataConfig, tokenizer_hash: str) -> str:
    """The name of `source`'s tokens under these settings (see the module)."""
    material = {"version": KEY_VERSION, "source": source.fingerprint(),
                **settings_material(cfg, tokenizer_hash)}
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
