"""LoRA supervised fine-tuning: next-token loss on the trained (unmasked) tokens.

    finetune run lora_sft [OVERRIDES...]

Config: configs/lora_sft.yaml. Trains a peft adapter (peft=lora, dora or rslora) on the frozen
base; `final/` holds the adapter in peft format.
"""

from finetune.train.loss import causal_lm_loss
from finetune.train.recipe import Recipe

RECIPE = Recipe(name="lora_sft", loss=causal_lm_loss, trains="adapter")
