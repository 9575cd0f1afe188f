"""build_data: sources -> formats -> template + mask -> (pack) -> collate, for one rank.

The trainer calls `build_data(cfg.data, tokenizer, attention=plan's attention, seed=...,
micro_batch_size=..., rank=..., world_size=...)` and gets a `TrainData`
(finetune.data.train_data): `train` (resumable micro-batches), `val_batches(max_batches)`,
`preview(n)` and `stats`. Here the settings are checked and the shared parts made (the encoder,
the collator, the sources); `InMemoryData` or, with data.streaming, `StreamingData` does the rest,
and `PreferenceData` (finetune.data.preference) when a recipe trains on preference pairs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from finetune.config.data import DataConfig, PaddingFree, TrainOn
from finetune.data.collate import Collator
from finetune.data.encode import FastEncoder, TokenCache, default_cache_dir
from finetune.data.errors import DataError
from finetune.data.in_memory import InMemoryData, build_in_memory
from finetune.data.ingest import tokenizer_fingerprint
from finetune.data.length import AUTO, UNKNOWN_CONTEXT, check_length_fits
from finetune.data.packing import packing_isolation
from finetune.data.pairs import check_pair_settings
from finetune.data.preference import PreferenceData, build_preference_data
from finetune.data.settings import check_settings, mixture_weights
from finetune.data.sources import Source, path_list, resolve_source, shared_source
from finetune.data.streaming import StreamingData
from finetune.data.template import resolve_template
from finetune.data.train_data import TrainData
from finetune.kernels.attention import ATTENTION
from finetune.kernels.attention import packing_isolation as attention_packing_isolation


def build_data(cfg: DataConfig, tokenizer: Any, *, attention: str, seed: int,
               micro_batch_size: int, rank: int = 0, world_size: int = 1,
               mask_dtype: torch.dtype = torch.float32,
               max_context: int | None = None, pairs: bool = False,
               device: torch.device | str = "cpu", held_out_apart: bool = True,
               evaluating: bool = False) -> TrainData:
    """Build the data for one rank. `attention` is the resolved attention implementation (it
    decides how packed documents are isolated); `mask_dtype` is the dtype of a 4D packed mask
    (the model's compute dtype); `max_context` the model's context length, the upper bound of
    data.max_seq_len=auto. With `pairs`, the data is preference pairs whose batches hold both
    answers of each pair (finetune.data.preference). With `held_out_apart` (training), a
    data.val_path that reads a file data.path reads too is refused. `evaluating` (finetune
    eval): only the held-out rows will be used, and the data's log line counts those alone.
    Raises DataError for bad data or settings."""
    check_settings(cfg)
    check_length_fits(cfg.max_seq_len, max_context)
    if pairs:
        check_pair_settings(cfg)
    auto_cap = None
    if cfg.max_seq_len == AUTO:
        if cfg.streaming:
            raise DataError("data.max_seq_len=auto needs the lengths of the whole dataset, which "
                            "data.streaming=true does not read up front: set data.max_seq_len=N "
                            "(e.g. data.max_seq_len=2048).")
        auto_cap = max_context or UNKNOWN_CONTEXT
        cfg = replace(cfg, max_seq_len=auto_cap)
    isolation = packing_isolation(attention) if cfg.packing else None
    padding_free = use_padding_free(cfg, attention, pairs=pairs)
    template, template_from = resolve_template(tokenizer, cfg.chat_template)
    # A pair's completion is its last assistant turn; the turns before it are its prompt.
    train_on = TrainOn.last_turn if pairs else cfg.train_on
    encoder = FastEncoder(tokenizer, template, train_on=train_on, max_seq_len=cfg.max_seq_len,
                          truncation=cfg.truncation, on_bad_row=cfg.on_bad_row,
                          cache=None if cfg.streaming else TokenCache(
                              default_cache_dir(cfg.cache_dir)))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # Packed-row masks are built on `device` (the model's) from the tokens' document ids.
    # Padding-free unpacked batches are flattened like varlen packed ones: one row, no mask.
    collator = Collator(pad_id=pad_id, isolation="varlen" if padding_free else isolation,
                        mask_dtype=mask_dtype, device=device)
    options = {"split": cfg.split, "json_key": cfg.json_key, "text_unit": cfg.text_unit}
    sources = [resolve_source(spec, **options) for spec in path_list(cfg.path)]
    weights = mixture_weights(cfg.weights, len(sources))
    val_sources = ([resolve_source(spec, **options, key="data.val_path")
                    for spec in path_list(cfg.val_path, "data.val_path")]
                   if cfg.val_path is not None else [])
    if held_out_apart:
        check_held_out_apart(sources, val_sources, cfg)
    data: StreamingData | InMemoryData | PreferenceData
    if pairs:
        data = build_preference_data(
            cfg, sources, val_sources, encoder, collator,
            tokenizer_hash=tokenizer_fingerprint(tokenizer, template), seed=seed,
            micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
            template_from=template_from, auto_cap=auto_cap, context=max_context)
    elif cfg.streaming:
        data = StreamingData(cfg, sources, weights, val_sources, encoder, collator, seed=seed,
                             micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                             isolation=isolation, template_from=template_from)
    else:
        data = build_in_memory(cfg, sources, weights, val_sources, encoder, collator,
                               tokenizer_hash=tokenizer_fingerprint(tokenizer, template),
                               seed=seed, micro_batch_size=micro_batch_size, rank=rank,
                               world_size=world_size, isolation=isolation,
                               template_from=template_from, auto_cap=auto_cap,
                               context=max_context, evaluating=evaluating)
    data.chat_template = template
    data.stats.padding_free = padding_free
    return data


def check_held_out_apart(sources: list[Source], val_sources: list[Source],
                         cfg: DataConfig) -> None:
    """Refuse held-out data that is training data too: its loss would not be held out."""
    shared = shared_source(sources, val_sources)
    if shared is not None:
        raise DataError(
            f"data.val_path={cfg.val_path} and data.path={cfg.path} both read {shared}: the "
            "held-out loss would be measured on rows the model trains on. Give data.val_path a "
            "file of its own, or leave it unset (data.val_path=null) to hold out a share of "
            f"data.path instead (data.val_split, now {cfg.val_split}; e.g. data.val_split=0.05).")


def use_padding_free(cfg: DataConfig, attention: str, *, pairs: bool = False) -> bool:
    """Whether unpacked micro-batches are collated as one padding-free row (data.padding_free):
    never with packing (packed rows follow the attention's own isolation) nor for preference
    pairs (scored as padded rows); `on` with an attention that cannot isolate the examples of
    such a row is an error."""
    if cfg.packing or pairs or cfg.padding_free == PaddingFree.off:
        return False
    capable = attention_packing_isolation(attention) == "varlen"
    if cfg.padding_free == PaddingFree.on and not capable:
        able = [name for name in ATTENTION.names() if attention_packing_isolation(name) == "varlen"]
        raise DataError(
            f"data.padding_free=on needs an attention that takes padding-free rows "
            f"({', '.join(able)}); this run's attention is {attention}. Set "
            f"kernels.attention=sdpa_varlen, or data.padding_free=auto.")
    return capable
