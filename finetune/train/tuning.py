"""`tune_kernels(cfg, plan, accelerator)`: kernels.autotune for a run, once its processes are up.

The table's plan is made before the Accelerator exists (it decides the collective and the
mixed precision); tuning then runs with the process group in place, so rank 0 measures and
broadcasts (finetune.kernels.tuned_plan). The shapes are the run's: the model's heads, kv
heads and head_dim, the precision, the micro-batch's rows at data.max_seq_len, its documents,
the hidden size, the LoRA rank and the vocabulary. The document lengths (and the row length
data.max_seq_len=auto settles on) come from the data itself: its sources are encoded as the
data pipeline encodes them, through the same tokenized-data cache, so the run then reads them
back from the cache. Where that is not possible (streaming data, preference pairs) packed rows
are assumed to hold documents of a quarter row on average, unpacked rows one of half a row,
and rows TUNE_SEQ_LEN long for data.max_seq_len=auto.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from finetune.config.schema import RunConfig
from finetune.kernels import KernelPlan, apply_env
from finetune.kernels.autotune import device_kind, expected_run_seconds
from finetune.kernels.tuned_plan import plan_with_autotune
from finetune.kernels.workloads import TuningShapes, document_rows
from finetune.metrics.flops import TrainingMode, flops_per_token
from finetune.models import context_length, load_model_config, model_facts

logger = logging.getLogger(__name__)

TUNE_SEQ_LEN = 512  # the row length timed when data.max_seq_len=auto
OPTIMIZER_TENSORS = 32  # trainable tensors the optimizer is timed over, at most
LENGTH_SAMPLE = 16  # document lengths taken from the data: evenly spaced quantiles
# Set by pytest for each test and inherited by the runs a test starts: kernels.autotune=auto
# then times nothing, so a test's plan never depends on how busy the machine is.
TEST_SESSION_ENV = "PYTEST_CURRENT_TEST"


def data_lengths(cfg: RunConfig, hf_config: Any) -> tuple[list[int], int] | None:
    """(LENGTH_SAMPLE document lengths spread over the data's distribution, the row length)
    for in-memory data, encoded as finetune.data.pipeline encodes it (the tokenized-data cache
    is shared); None for streaming data."""
    from finetune.data.encode import FastEncoder, TokenCache, default_cache_dir
    from finetune.data.ingest import source_key, tokenizer_fingerprint
    from finetune.data.length import AUTO, UNKNOWN_CONTEXT, choose_max_seq_len
    from finetune.data.sources import path_list, resolve_source
    from finetune.data.template import resolve_template
    from finetune.models import load_tokenizer

    data = cfg.data
    if data.streaming:
        return None
    auto = data.max_seq_len == AUTO
    if auto:
        data = replace(data, max_seq_len=context_length(hf_config) or UNKNOWN_CONTEXT)
    tokenizer = load_tokenizer(cfg.model)
    template, _ = resolve_template(tokenizer, data.chat_template)
    encoder = FastEncoder(tokenizer, template, train_on=data.train_on,
                          max_seq_len=data.max_seq_len, truncation=data.truncation,
                          on_bad_row=data.on_bad_row,
                          cache=TokenCache(default_cache_dir(data.cache_dir)))
    fingerprint = tokenizer_fingerprint(tokenizer, template)
    options = {"split": data.split, "json_key": data.json_key, "text_unit": data.text_unit}
    lengths = np.concatenate([
        encoder.encode_source(source, data, source_key(source, data, fingerprint)).rows.lengths
        for source in (resolve_source(spec, **options) for spec in path_list(data.path))])
    if not len(lengths):
        return None
    row = (choose_max_seq_len(lengths, int(data.max_seq_len), data.truncation).length
           if auto else int(data.max_seq_len))
    quantiles = np.quantile(np.minimum(lengths, row), np.linspace(0, 1, LENGTH_SAMPLE))
    order = np.random.default_rng(0).permutation(LENGTH_SAMPLE)  # not sorted within a row
    return [max(1, int(quantiles[i])) for i in order], row


def run_shapes(cfg: RunConfig, hf_config: Any, kernel_plan: KernelPlan, device: str, *,
               mean_document: int | None = None, pairs: bool = False) -> TuningShapes:
    """The shapes this run's kernels work at (see the module docstring); `mean_document`
    replaces the data's document lengths with that mean (`finetune env --autotune
    --doc-length`); `pairs`: the recipe trains on preference pairs (their lengths are not
    read)."""
    facts = model_facts(hf_config)
    length = cfg.data.max_seq_len
    found = None if mean_document or pairs else data_lengths(cfg, hf_config)
    sample: list[int] = []
    if found is not None:
        sample, length = found
    elif not isinstance(length, int):
        length = min(TUNE_SEQ_LEN, context_length(hf_config) or TUNE_SEQ_LEN)
    packing = bool(cfg.data.packing)
    mean = mean_document or (length // 4 if packing else length // 2)
    rows = document_rows(length, cfg.trainer.micro_batch_size, mean, packing=packing,
                         device_kind=device_kind(device), lengths=sample)
    hidden = int(hf_config.hidden_size)
    full = str(cfg.peft.method) == "none"
    rank = int(getattr(cfg.peft, "r", 8) or 8)
    trainable = ((hidden, hidden),) if full else ((rank, hidden), (hidden, rank))
    count = OPTIMIZER_TENSORS // len(trainable)
    assert facts.num_heads and facts.num_kv_heads and facts.head_dim
    return TuningShapes(facts.num_heads, facts.num_kv_heads, facts.head_dim,
                        kernel_plan.precision, rows, packing, hidden=hidden, lora_rank=rank,
                        trainable=trainable * count,
                        vocab=int(getattr(hf_config, "vocab_size", 0) or 0),
                        intermediate=int(getattr(hf_config, "intermediate_size", 0) or 0))


def _run_seconds(cfg: RunConfig, hf_config: Any, kernel_plan: KernelPlan, world_size: int):
    """The run's expected compute seconds from the config alone (no data read): rows of
    data.max_seq_len tokens (TUNE_SEQ_LEN for auto), half full when unpacked."""
    def estimate(rates: Mapping[str, float]) -> float | None:
        if cfg.trainer.max_steps <= 0:
            return None  # epochs over data not read yet
        mode = TrainingMode(full=str(cfg.peft.method) == "none")
        length = cfg.data.max_seq_len if isinstance(cfg.data.max_seq_len, int) else TUNE_SEQ_LEN
        per_row = length if cfg.data.packing else length // 2
        tokens = (cfg.trainer.max_steps * cfg.trainer.micro_batch_size
                  * cfg.trainer.grad_accum_steps * world_size * per_row)
        rate = rates.get("fp32" if kernel_plan.precision == "fp32" else "bf16")
        return expected_run_seconds(flops_per_token(hf_config, mode), tokens, rate)

    return estimate


def tune_kernels(cfg: RunConfig, kernel_plan: KernelPlan, accelerator: Any, *,
                 pairs: bool = False) -> KernelPlan:
    """`kernel_plan` with kernels.autotune applied on this run's devices; every rank returns the
    same choices. `pairs`: the recipe trains on preference pairs. The plan's environment is
    applied again when tuning changed the plan."""
    if str(cfg.kernels.autotune) == "off":
        return plan_with_autotune(kernel_plan.hardware, cfg.kernels, kernel_plan.model_facts,
                                  packing=kernel_plan.packing, shapes=None,  # type: ignore[arg-type]
                                  device="cpu", table_plan=kernel_plan,
                                  run_seconds=lambda rates: None)
    hf_config = load_model_config(cfg.model)
    device = str(accelerator.device)
    broadcast = None
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        def broadcast(box: list[Any]) -> None:
            dist.broadcast_object_list(box, src=0)

    tuned = plan_with_autotune(
        kernel_plan.hardware, cfg.kernels, model_facts(hf_config), packing=kernel_plan.packing,
        shapes=lambda: run_shapes(cfg, hf_config, kernel_plan, device, pairs=pairs),
        device=device, table_plan=kernel_plan,
        run_seconds=_run_seconds(cfg, hf_config, kernel_plan, accelerator.num_processes),
        rank=accelerator.process_index, local_rank=accelerator.local_process_index,
        broadcast=broadcast, under_test=TEST_SESSION_ENV in os.environ)
    outcome = tuned.autotune or {}
    logger.info("kernels.autotune: %s%s", "tuned" if outcome.get("tuned") else "not tuned",
                f" ({outcome.get('why')})" if outcome.get("why") else "")
    if tuned.kernels != kernel_plan.kernels:
        apply_env(tuned)
    return tuned
