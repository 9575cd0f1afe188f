"""The plain encode path: chat template, HF fast tokenizer with offset tracking, assembly.

Each example is rendered with the chat template (`ChatRenderer`); the texts of a batch are
tokenized with the fast tokenizer's batch encoder, tracking character offsets and adding no
special tokens; each trained character span becomes the range of tokens that hold any of its
characters; `assemble` applies BOS, EOS, truncation and the trained flags. A tokenizer without
offsets (no fast backend) counts the tokens of each prefix instead. `FastEncoder`
(finetune.data.encode.fast) is a drop-in that gives the same rows faster.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from finetune.config.data import DataConfig, OnBadRow, Truncation
from finetune.data.encode.assembly import CharSpans, TokenBatch, assemble, eos_flags, flatten
from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import Example, RowConverter
from finetune.data.ingest import SourceTokens, batches_of, examples_from, source_converter
from finetune.data.settings import setting_choice
from finetune.data.sources import Source, SourceRow
from finetune.data.template import ChatRenderer
from finetune.data.tokenized import RowCounts, TokenizedRows, reject


class _Ids(NamedTuple):
    """Token ids from a tokenizer without offsets (in place of a fast tokenizer's Encoding)."""

    ids: list[int]


@dataclass
class RenderedBatch:
    """The texts of a batch's usable rows, their trained character spans and origins."""

    texts: list[str]
    spans: list[CharSpans]
    origins: list[RowOrigin]


def backend_of(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer, or None."""
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


def _token_at(enc: Any, char: int, end: int) -> tuple[int, int] | None:
    """(index, start char) of the token holding the first mapped character in [char, end)."""
    while char < end:
        t = enc.char_to_token(char)
        if t is not None:
            return t, enc.token_to_chars(t)[0]
        char += 1
    return None


def span_tokens_from_offsets(enc: Any, a: int, b: int, n_chars: int,
                             n_tokens: int) -> tuple[int, int]:
    """Token range [ta, tb) of the tokens that hold any character of text[a:b]. A token that
    straddles the start is trained: it is what the model must emit to begin the turn (e.g.
    "\u2581Sure" after a prompt ending in a space)."""
    if b <= a:
        return n_tokens, n_tokens
    ta = enc.char_to_token(a)
    if ta is None:  # a character the tokenizer dropped (or no token at all)
        first = _token_at(enc, a, b)
        if first is None:
            return n_tokens, n_tokens
        ta = first[0]
    last = enc.char_to_token(b) if b < n_chars else None
    if last is None:
        found = _token_at(enc, b, n_chars)
        if found is None:
            return ta, n_tokens
        last = found[0]
    return ta, last if enc.token_to_chars(last)[0] >= b else last + 1


class OffsetEncoder:
    """Turns batches of (Example, origin) into TokenizedRows; bad rows raise or are counted.

    Meets the `Encoder` contract (finetune.data.encode): `encode` does one batch,
    `encode_batches` many in order, `encode_source` every row of a source. Raises DataError for
    a setting it cannot work with.
    """

    renderer_type: type[ChatRenderer] = ChatRenderer

    def __init__(self, tokenizer: Any, template: str, *, train_on: str = "assistant",
                 max_seq_len: int, truncation: str = "truncate",
                 on_bad_row: str = "error") -> None:
        self.renderer = self.renderer_type(tokenizer, template, train_on=train_on)
        truncation = setting_choice(Truncation, truncation, "truncation")
        on_bad_row = setting_choice(OnBadRow, on_bad_row, "on_bad_row")
        if max_seq_len < 2:
            raise DataError(f"data.max_seq_len={max_seq_len} is too small; use at least 2")
        self.tokenizer = tokenizer
        self.max_seq_len, self.truncation, self.on_bad_row = max_seq_len, truncation, on_bad_row
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.backend = backend_of(tokenizer)
        self.train_all = train_on == "all"

    def encode(self, items: list[tuple[Example, RowOrigin]], counts: RowCounts) -> TokenizedRows:
        """One batch, in order; rows dropped by the row rules are left out."""
        batch = self._render(items, counts)
        return self._assemble(batch, self._tokenize(batch.texts), counts)

    def encode_batches(self, batches: Iterable[list[tuple[Example, RowOrigin]]],
                       counts: RowCounts) -> Iterator[TokenizedRows]:
        """`encode` over each batch, in order."""
        for items in batches:
            yield self.encode(items, counts)

    def encode_source(self, source: Source, cfg: DataConfig, key: str) -> SourceTokens:
        """Every row of `source` in file order: its format (data.format, or detected), its rows
        converted (data.columns) and encoded. `key` names these tokens (ingest.source_key)."""
        name, converter = source_converter(source, cfg)
        rows, counts = self._encode_rows(source.rows(), converter)
        return SourceTokens(source, name, rows, counts, key, from_cache=False)

    def _encode_rows(self, rows: Iterator[SourceRow],
                     converter: RowConverter) -> tuple[TokenizedRows, RowCounts]:
        counts = RowCounts()
        batches = batches_of(examples_from(rows, converter, counts, self.on_bad_row))
        return TokenizedRows.concat(list(self.encode_batches(batches, counts))), counts

    def _render(self, items: list[tuple[Example, RowOrigin]], counts: RowCounts) -> RenderedBatch:
        texts, spans, origins = [], [], []
        render = self.renderer.render
        for example, origin in items:
            try:
                rendered = render(example)
            except BadRow as bad:
                reject(bad, origin, counts, self.on_bad_row)
                continue
            texts.append(rendered.text)
            spans.append(rendered.spans)
            origins.append(origin)
        return RenderedBatch(texts, spans, origins)

    def _tokenize(self, texts: list[str]) -> list[Any]:
        """One encoding per text (`.ids`, and the character map when the tokenizer has one)."""
        if self.backend is not None:
            return self.backend.encode_batch(texts, add_special_tokens=False)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [_Ids(list(i)) for i in ids]

    def _assemble(self, batch: RenderedBatch, encoded: list[Any],
                  counts: RowCounts) -> TokenizedRows:
        if not batch.texts:
            return TokenizedRows.empty()
        return assemble(self._token_batch(batch, encoded), counts, bos=self.bos, eos=self.eos,
                        max_seq_len=self.max_seq_len, truncation=self.truncation,
                        train_all=self.train_all)

    def _token_batch(self, batch: RenderedBatch, encoded: list[Any]) -> TokenBatch:
        """The batch's ids and the token range of every trained span."""
        ids = [enc.ids for enc in encoded]
        row, ta, tb = [], [], []
        for k, (text, spans, enc) in enumerate(zip(batch.texts, batch.spans, encoded,
                                                   strict=True)):
            for ta_k, tb_k in self._row_spans(text, enc, spans):
                row.append(k)
                ta.append(ta_k)
                tb.append(tb_k)
        flat, row_starts = flatten(ids)
        return TokenBatch(flat, row_starts, np.array(row, np.int64), np.array(ta, np.int64),
                          np.array(tb, np.int64), eos_flags(batch.spans), batch.origins)

    def _row_spans(self, text: str, enc: Any, spans: CharSpans) -> list[tuple[int, int]]:
        """Token ranges of one row's character spans, from the encoding's character map."""
        n_chars, n_tokens = len(text), len(enc.ids)
        if not isinstance(enc, _Ids):
            return [span_tokens_from_offsets(enc, a, b, n_chars, n_tokens) for a, b, _ in spans]
        # A tokenizer without offsets: count the tokens of each prefix.
        def count(char: int) -> int:
            if char >= n_chars:
                return n_tokens
            return len(self.tokenizer(text[:char], add_special_tokens=False)["input_ids"])
        return [(count(a), count(b)) for a, b, _ in spans]
