"""Using what a run made: load it for inference, measure its loss and perplexity on a dataset,
and sample completions (`finetune eval`, `finetune generate`, samples.jsonl during training)."""

from finetune.evaluate.inference import Loaded, inference_device, load_for_inference
from finetune.evaluate.perplexity import EvalResult, evaluate_loss
from finetune.evaluate.sampling import (
    SampleWriter,
    Sampling,
    generate_text,
    generate_texts,
    prompt_ids,
)

__all__ = ["EvalResult", "Loaded", "SampleWriter", "Sampling", "evaluate_loss",
           "generate_text", "generate_texts", "inference_device", "load_for_inference", "prompt_ids"]
