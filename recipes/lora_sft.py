"""LoRA supervised fine-tuning: next-token loss on the trained (unmasked) tokens.

    finetune run lora_sft [OVERRIDES...]

Config: configs/lora_sft.yaml. The loop, checkpoints and metrics live in finetune/train/.
"""

from finetune.config.schema import RunConfig
from finetune.train.loss import causal_lm_loss
from finetune.train.run import run_training


def train(cfg: RunConfig) -> int:
    """Run the recipe; return the process exit code."""
    return run_training(cfg, loss_fn=causal_lm_loss)
