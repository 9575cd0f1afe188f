"""Full supervised fine-tuning: every weight trains with the next-token loss.

    finetune run full_sft [OVERRIDES...]

Config: configs/full_sft.yaml (peft: none). `final/` holds the whole model in Hugging Face
format.
"""

from finetune.train.loss import causal_lm_loss
from finetune.train.recipe import Recipe

RECIPE = Recipe(name="full_sft", loss=causal_lm_loss, trains="all")
