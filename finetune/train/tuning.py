"""`tune_kernels(cfg, plan, accelerator)`: kernels.autotune for a run, once its processes are up.

The table's plan is made before the Accelerator exists (it decides the collective and the
mixed precision); tuning then runs with the process group in place, so rank 0 measures and
broadcasts (finetune.kernels.tuned_plan). The shapes are the run's: the model's heads, kv
heads and head_dim, the precision, the micro-batch's rows at data.max_seq_len (a bounded
TUNE_SEQ_LEN for data.max_seq_len=auto, whose length is only known once the data is read), its
documents (packed rows hold documents of a quarter row on average, unpacked rows one of half a
row), the hidden size and the LoRA rank.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

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
# Set by pytest for each test and inherited by the runs a test starts: kernels.autotune=auto
# then times nothing, so a test's plan never depends on how busy the machine is.
TEST_SESSION_ENV = "PYTEST_CURRENT_TEST"


def run_shapes(cfg: RunConfig, hf_config: Any, kernel_plan: KernelPlan, device: str, *,
               mean_document: int | None = None) -> TuningShapes:
    """The shapes this run's kernels work at (see the module docstring); `mean_document`
    replaces the assumed mean document length (`finetune env --autotune --doc-length`)."""
    facts = model_facts(hf_config)
    length = cfg.data.max_seq_len
    if not isinstance(length, int):
        length = min(TUNE_SEQ_LEN, context_length(hf_config) or TUNE_SEQ_LEN)
    packing = bool(cfg.data.packing)
    mean = mean_document or (length // 4 if packing else length // 2)
    rows = document_rows(length, cfg.trainer.micro_batch_size, mean, packing=packing,
                         device_kind=device_kind(device))
    hidden = int(hf_config.hidden_size)
    full = str(cfg.peft.method) == "none"
    rank = int(getattr(cfg.peft, "r", 8) or 8)
    trainable = ((hidden, hidden),) if full else ((rank, hidden), (hidden, rank))
    count = OPTIMIZER_TENSORS // len(trainable)
    assert facts.num_heads and facts.num_kv_heads and facts.head_dim
    return TuningShapes(facts.num_heads, facts.num_kv_heads, facts.head_dim,
                        kernel_plan.precision, rows, packing, hidden=hidden, lora_rank=rank,
                        trainable=trainable * count,
                        vocab=int(getattr(hf_config, "vocab_size", 0) or 0))


def _run_seconds(cfg: RunConfig, hf_config: Any, kernel_plan: KernelPlan, shapes: TuningShapes,
                 world_size: int):
    def estimate(rates: Mapping[str, float]) -> float | None:
        if cfg.trainer.max_steps <= 0:
            return None  # epochs over data not read yet
        mode = TrainingMode(full=str(cfg.peft.method) == "none")
        rows = len(shapes.rows) or 1
        tokens = (cfg.trainer.max_steps * cfg.trainer.micro_batch_size
                  * cfg.trainer.grad_accum_steps * world_size * shapes.tokens // rows)
        rate = rates.get("fp32" if kernel_plan.precision == "fp32" else "bf16")
        return expected_run_seconds(flops_per_token(hf_config, mode), tokens, rate)

    return estimate


def tune_kernels(cfg: RunConfig, kernel_plan: KernelPlan, accelerator: Any) -> KernelPlan:
    """`kernel_plan` with kernels.autotune applied on this run's devices; every rank returns the
    same choices. The plan's environment is applied again when tuning changed the plan."""
    if str(cfg.kernels.autotune) == "off":
        return plan_with_autotune(kernel_plan.hardware, cfg.kernels, kernel_plan.model_facts,
                                  packing=kernel_plan.packing, shapes=None,  # type: ignore[arg-type]
                                  device="cpu", table_plan=kernel_plan,
                                  run_seconds=lambda rates: None)
    hf_config = load_model_config(cfg.model)
    device = str(accelerator.device)
    shapes = run_shapes(cfg, hf_config, kernel_plan, device)
    broadcast = None
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        def broadcast(box: list[Any]) -> None:
            dist.broadcast_object_list(box, src=0)

    tuned = plan_with_autotune(
        kernel_plan.hardware, cfg.kernels, model_facts(hf_config), packing=kernel_plan.packing,
        shapes=shapes, device=device, table_plan=kernel_plan,
        run_seconds=_run_seconds(cfg, hf_config, kernel_plan, shapes,
                                 accelerator.num_processes),
        rank=accelerator.process_index, local_rank=accelerator.local_process_index,
        broadcast=broadcast, under_test=TEST_SESSION_ENV in os.environ)
    outcome = tuned.autotune or {}
    logger.info("kernels.autotune: %s%s", "tuned" if outcome.get("tuned") else "not tuned",
                f" ({outcome.get('why')})" if outcome.get("why") else "")
    if tuned.kernels != kernel_plan.kernels:
        apply_env(tuned)
    return tuned
