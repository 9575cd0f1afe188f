"""Load a base model, a run, a checkpoint or a merged folder for inference, on the best device.

The chat template is the one the run trained with: a run's final/ and an adapter folder keep it
beside the weights; a checkpoint has the base tokenizer, so the run's data.chat_template (or the
built-in template for a tokenizer without one) is applied to it here, as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.adapters.export import TrainedSource, describe_source, load_trained_model

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model ready for inference (eval mode, on `device`), its tokenizer and where it came
    from; `run_config` is the run's resolved config when it came from a run."""

    model: Any
    tokenizer: Any
    source: TrainedSource
    run_config: dict | None
    device: torch.device


def inference_device() -> tuple[torch.device, torch.dtype]:
    """The accelerator to infer on and its dtype: CUDA/ROCm or XPU in bf16 where supported
    (fp16 otherwise), Apple MPS in fp16, else the CPU in fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu"), torch.bfloat16
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.float16
    return torch.device("cpu"), torch.float32


def load_for_inference(source: Path | str, *, device: torch.device | None = None,
                       dtype: torch.dtype | None = None, attention: str = "sdpa") -> Loaded:
    """Load `source` (see finetune.adapters.export.describe_source) on `device` (default:
    `inference_device()`) with transformers' `attention` implementation and the run's chat
    template. Errors: ConfigError (exit code 2) for a folder that is not a model,
    CheckpointError for an unusable checkpoint."""
    from finetune.data.template import resolve_template

    found = describe_source(source)
    best_device, best_dtype = inference_device()
    device, dtype = device or best_device, dtype or best_dtype
    model, tokenizer = load_trained_model(source, dtype=dtype, attention=attention)
    run_config = found.run_config()
    if found.kind == "checkpoint" and run_config is not None:
        template, origin = resolve_template(tokenizer, run_config["data"].get("chat_template"))
        tokenizer.chat_template = template
        logger.info("chat template of the run (%s)", origin)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return Loaded(model, tokenizer, found, run_config, device)
