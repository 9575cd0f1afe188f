"""finetune: vendor-neutral LLM fine-tuning."""

__version__ = "0.1.0"
