"""Preference rows -> token pairs: the chosen and the rejected completion of one prompt.

A pair is kept whole or not at all. Its two sequences are stored next to each other in one
`TokenizedRows` (pair i is rows 2i, chosen, and 2i + 1, rejected), each as prompt + completion
with only the completion trained, so the rest of the pipeline (cache, selection, collation)
handles them as ordinary rows. The prompt is what the two share: a `prompt` field, or, for a
conversation given whole in `chosen` and `rejected`, every turn before the last assistant turn
(which must then be the same in both); the last assistant turn is the completion.

The rules of a row (BOS, EOS, data.truncation, no trained token left) are the encoder's, applied
to each sequence; when one of a pair is dropped or refused the whole pair is. A pair whose two
sequences are identical (the same answer twice, or two empty answers) is left out and counted as
skipped: its DPO gradient is exactly zero. Counts are of pairs, never of sequences.
`check_pair_settings` refuses the data settings that cannot give pairs, before any data is read.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from finetune.config.data import DataConfig, Truncation
from finetune.data.encode import Encoder
from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.formats import ASSISTANT, Example, converter_for
from finetune.data.ingest import SourceTokens, batches_of, examples_from
from finetune.data.length import recount_cut
from finetune.data.sources import Source
from finetune.data.tokenized import RowCounts, TokenizedRows, reject

logger = logging.getLogger(__name__)

PAIR_FORMAT = "preference"
# Bump when the same source and settings give other pair tokens. Pairs left out (identical
# answers) change the number of pairs, which a resume checks on its own.
PAIR_KEY_VERSION = 1
IDENTICAL = "identical_pair"  # the skip reason of a pair whose two answers encode the same
IDENTICAL_MESSAGE = ("'chosen' and 'rejected' give the same completion, so the pair carries no "
                     "preference signal")


def check_pair_settings(cfg: DataConfig) -> None:
    """Raise DataError for a data.* setting that preference pairs cannot use (see each reason)."""
    if cfg.format not in ("auto", PAIR_FORMAT):
        raise DataError(f"data.format={cfg.format} gives no preference pairs: DPO needs rows "
                        "with prompt/chosen/rejected. Set data.format=preference (or auto).")
    if cfg.packing:
        raise DataError("data.packing=true is not supported for preference pairs: each pair's "
                        "chosen and rejected completions are scored as whole padded rows of one "
                        "batch. Set data.packing=false.")
    if cfg.streaming:
        raise DataError("data.streaming=true is not supported for preference pairs (pairs are "
                        "read and tokenized up front). Set data.streaming=false.")
    if str(cfg.train_on) == "all":
        raise DataError("data.train_on=all would score the prompt too; preference training "
                        "scores the completions only. Leave data.train_on=assistant.")
    if cfg.weights is not None:
        raise DataError("data.weights (a mixture) is not supported for preference pairs; give "
                        "one data.path, or a list of paths whose rows are all used once.")


def split_pair(example: Example) -> tuple[Example, Example]:
    """(chosen, rejected) of a preference Example, each prompt + completion.

    Raises BadRow when there is no rejected answer, when one side is a conversation and the
    other text, or when two conversations differ before their last assistant turn.
    """
    rejected = example.rejected
    if rejected is None:
        raise BadRow("missing_field", "field 'rejected' is missing",
                     "give every row a 'rejected' answer")
    chosen = Example(messages=example.messages, segments=example.segments)
    if chosen.messages is None and rejected.messages is None:
        return chosen, rejected
    if chosen.messages is None or rejected.messages is None:
        raise BadRow("wrong_type", "'chosen' and 'rejected' must both be text or both be "
                     "message lists", "write both answers the same way")
    for name, turns in (("chosen", chosen.messages), ("rejected", rejected.messages)):
        if turns[-1][0] != ASSISTANT:
            raise BadRow("no_assistant_turn", f"{name!r} does not end with an assistant turn, "
                         "so it has no completion to score", "end it with the assistant's answer")
    if chosen.messages[:-1] != rejected.messages[:-1]:
        raise BadRow("prompt_mismatch", "'chosen' and 'rejected' differ before their last "
                     "assistant turn; everything before it is the prompt the two share",
                     "give both the same conversation up to the final answer, or put the "
                     "shared conversation in a 'prompt' field")
    return chosen, rejected


def pair_key(source_key: str) -> str:
    """The cache key of a source's pairs: its ordinary key, marked so it never names rows."""
    blob = f"{source_key}:pairs:{PAIR_KEY_VERSION}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def encode_pair_source(encoder: Encoder, source: Source, cfg: DataConfig,
                       key: str) -> SourceTokens:
    """Every pair of `source` in file order, as interleaved rows (see the module); read from
    and written to the encoder's tokenized-data cache (if it has one) under `key`."""
    cache = getattr(encoder, "cache", None)
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            rows, meta = hit
            logger.info("%s: %d pairs from the tokenized-data cache", source.spec, len(rows) // 2)
            return SourceTokens(source, PAIR_FORMAT, rows, RowCounts.from_dict(meta["counts"]),
                                key, from_cache=True)
    converter = converter_for(PAIR_FORMAT, dict(cfg.columns or {}))
    counts = RowCounts()
    parts = []
    for batch in batches_of(examples_from(source.rows(), converter, counts, cfg.on_bad_row)):
        pairs = []
        for example, origin in batch:
            try:
                chosen, rejected = split_pair(example)
            except BadRow as bad:
                reject(bad, origin, counts, cfg.on_bad_row)
                continue
            pairs.append((chosen, rejected, origin))
        parts.append(_encode_pairs(encoder, pairs, counts))
    rows = TokenizedRows.concat(parts)
    logger.info("%s: %d pairs from %d rows", source.spec, len(rows) // 2, counts.read)
    if cache is not None:
        cache.store(key, rows, {"format": PAIR_FORMAT, "counts": counts.to_dict(),
                                "spec": source.spec})
    return SourceTokens(source, PAIR_FORMAT, rows, counts, key, from_cache=False)


def _encode_pairs(encoder: Encoder, pairs: list[tuple[Example, Example, RowOrigin]],
                  counts: RowCounts) -> TokenizedRows:
    """The pairs' rows, interleaved, without the pairs that carry no signal; `counts` counts
    pairs: truncated (a sequence cut, the pair kept), dropped, skipped. The whole batch is
    encoded at once; only when a sequence was cut or left out are the pairs encoded one by one,
    to count and keep whole pairs."""
    items = [(example, origin) for chosen, rejected, origin in pairs
             for example in (chosen, rejected)]
    scratch = RowCounts()
    rows = encoder.encode(items, scratch)
    if len(rows) == len(items) and not scratch.truncated:
        return drop_identical(rows, counts, [origin for _, _, origin in pairs])
    kept, origins = [], []
    for chosen, rejected, origin in pairs:
        one = RowCounts()
        got = encoder.encode([(chosen, origin), (rejected, origin)], one)
        if len(got) == 2:
            counts.truncated += int(one.truncated > 0)
            kept.append(got)
            origins.append(origin)
        elif not one.skipped:
            counts.dropped += 1
        one.truncated = one.dropped = 0  # counted per pair, above
        counts.merge(one)
    return drop_identical(TokenizedRows.concat(kept), counts, origins)


def identical_pairs(rows: TokenizedRows) -> np.ndarray:
    """For each pair of `rows`, whether its two sequences are the same tokens with the same
    trained flags: the DPO loss of such a pair is constant, its gradient exactly zero."""
    lengths, starts = rows.lengths, rows.offsets[:-1]
    same = lengths[0::2] == lengths[1::2]
    for i in np.flatnonzero(same):
        a, b, n = int(starts[2 * i]), int(starts[2 * i + 1]), int(lengths[2 * i])
        same[i] = (np.array_equal(rows.tokens[a:a + n], rows.tokens[b:b + n])
                   and np.array_equal(rows.trained[a:a + n], rows.trained[b:b + n]))
    return same


def drop_identical(rows: TokenizedRows, counts: RowCounts,
                   origins: list[RowOrigin]) -> TokenizedRows:
    """`rows` without the pairs whose chosen and rejected sequences are identical; each is
    counted as skipped (IDENTICAL, whatever data.on_bad_row says: the row is not malformed, it
    just teaches nothing), the first ones with their origin (`origins`: one per pair)."""
    same = identical_pairs(rows)
    if not same.any():
        return rows
    for i in np.flatnonzero(same):
        reject(BadRow(IDENTICAL, IDENTICAL_MESSAGE), origins[i], counts, "skip")
    return select_pairs(rows, np.flatnonzero(~same))


def pair_lengths(rows: TokenizedRows) -> np.ndarray:
    """The length of each pair: that of its longer sequence."""
    lengths = rows.lengths
    return np.maximum(lengths[0::2], lengths[1::2])


def select_pairs(rows: TokenizedRows, pairs: np.ndarray) -> TokenizedRows:
    """The pairs at indices `pairs`, in that order."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return rows.select(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1))


def cut_pairs(rows: TokenizedRows, length: int, truncation: str,
              counts: RowCounts) -> TokenizedRows:
    """`rows` (pairs) under max_seq_len=`length`, as if encoded with it: a sequence over it is
    cut (truncate) or its pair dropped (drop); a pair with a sequence left without a trained
    token is dropped, one whose sequences are identical once cut is skipped. `counts` are the
    pairs' as encoded with a longer limit; each pair stays counted once (length.recount_cut)."""
    lengths = rows.lengths
    over = lengths > length
    if not over.any():
        return rows
    starts = rows.offsets[:-1]
    keep = np.ones(len(rows) // 2, bool)
    if truncation == Truncation.drop:
        keep &= ~(over[0::2] | over[1::2])
        kept_lengths = lengths
    else:
        kept_lengths = np.minimum(lengths, length)
        for i in np.flatnonzero(over):
            a = int(starts[i])
            if not rows.trained[a:a + length].any():
                keep[i // 2] = False
    index = np.stack([2 * np.flatnonzero(keep), 2 * np.flatnonzero(keep) + 1], 1).reshape(-1)
    n = kept_lengths[index]
    offsets = np.zeros(len(index) + 1, np.int64)
    np.cumsum(n, out=offsets[1:])
    gather = np.repeat(starts[index] - offsets[:-1], n) + np.arange(offsets[-1], dtype=np.int64)
    cut = TokenizedRows(rows.tokens[gather], rows.trained[gather], offsets)
    same = identical_pairs(cut)  # cut within the answers' shared start
    kept_over = (over[0::2] | over[1::2])[keep] & ~same
    recount_cut(counts, kept_over=int(kept_over.sum()), removed=int((~keep).sum()))
    counts.skipped[IDENTICAL] += int(same.sum())
    return select_pairs(cut, np.flatnonzero(~same)) if same.any() else cut
