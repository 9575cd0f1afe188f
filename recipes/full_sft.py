"""Full supervised fine-tuning: every weight trains with the next-token loss.

    finetune run full_sft [OVERRIDES...]

Config: configs/full_sft.yaml (peft: none). The loop lives in finetune/train/.
"""

from finetune.config.schema import RunConfig
from finetune.train.loss import causal_lm_loss
from finetune.train.run import run_training


def train(cfg: RunConfig) -> int:
    """Run the recipe; return the process exit code."""
    return run_training(cfg, loss_fn=causal_lm_loss)
