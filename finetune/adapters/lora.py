"""Attach LoRA-family adapters through peft, and merge them back into the base weights."""

from __future__ import annotations

import logging

from finetune.config.schema import PeftConfig

logger = logging.getLogger(__name__)


def apply_adapter(model, cfg: PeftConfig):
    """Wrap `model` with the configured adapter and return the model to train.

    `method: none` returns the model unchanged with every weight trainable (full fine-tune).
    Adapter weights stay fp32 even when the frozen base is bf16/fp16. `method: qlora` is LoRA;
    on a 4-bit base (finetune.adapters.qlora) the base is first prepared for training, and on
    a full-precision base (a QLoRA run loaded for evaluation or merging) it is plain LoRA.
    """
    if cfg.method == "none":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    from finetune.adapters.qlora import QLORA, is_quantized, prepare_quantized

    if cfg.method == QLORA and is_quantized(model):
        model = prepare_quantized(model)

    targets = cfg.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
        use_dora=cfg.method == "dora",
        use_rslora=cfg.method == "rslora",
    )
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter DeepSpeed ZeRO-3 partitioned counts
    its whole size (`ds_numel`), not the empty placeholder the module holds."""
    def size(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total
