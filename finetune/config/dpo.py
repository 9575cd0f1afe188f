"""Schema of the `dpo` config group: the preference objective of the dpo recipe.

Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) with the sigmoid loss,
optionally label-smoothed (conservative DPO, Mitchell 2023); or IPO (Azar et al., 2023,
arXiv:2310.12036). docs/recipes.md lists the keys and the metrics they produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config.choice import Choice
from finetune.errors import ConfigError


class DpoLoss(Choice):
    """The preference loss: DPO's sigmoid loss, or IPO's squared loss."""

    sigmoid = "sigmoid"
    ipo = "ipo"


@dataclass
class DpoConfig:
    """How strongly the policy may move from the reference, and which loss pulls it.

    `beta`: the KL strength (DPO's beta; IPO's tau). `label_smoothing`: the assumed share of
    flipped preference labels (conservative DPO; sigmoid loss only). `precompute_ref`: compute
    the reference policy's log-probabilities of every training pair once at setup instead of
    once per step (saves a forward pass a step, and the frozen copy of a full fine-tune).
    """

    beta: float = 0.1
    loss: DpoLoss = DpoLoss.sigmoid
    label_smoothing: float = 0.0
    precompute_ref: bool = False


def check_dpo(cfg: DpoConfig) -> None:
    """Raise ConfigError, naming the key and the accepted range, for a value that cannot work."""
    if not cfg.beta > 0:
        raise ConfigError(f"dpo.beta={cfg.beta} must be positive (0.1 is usual; smaller lets the "
                          "policy move further from the reference).")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={cfg.label_smoothing} must be in [0, 0.5): the "
                          "share of preference labels assumed flipped.")
    if cfg.label_smoothing > 0 and str(cfg.loss) == DpoLoss.ipo:
        raise ConfigError("dpo.label_smoothing applies to dpo.loss=sigmoid only (conservative "
                          "DPO); set dpo.label_smoothing=0 with dpo.loss=ipo.")
