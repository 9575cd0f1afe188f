"""Model loading: the built-in tiny model and any Hugging Face causal LM."""

from finetune.models.load import (
    context_length,
    load_model,
    load_model_config,
    load_tokenizer,
    model_facts,
    resolve_model_path,
)

__all__ = ["context_length", "load_model", "load_model_config", "load_tokenizer", "model_facts",
           "resolve_model_path"]
