"""Adapters (LoRA, DoRA, rsLoRA) through peft; merge and export."""

from finetune.adapters.lora import apply_adapter, count_parameters

__all__ = ["apply_adapter", "count_parameters"]
