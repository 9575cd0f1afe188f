"""Loss-head candidates: how the LM head and the cross-entropy run (`kernels.fused_linear_cross_entropy`).

- `liger`: Liger's fused linear cross-entropy (Triton; CUDA, ROCm, XPU), patched into the model
  with the other Liger ops (`kernels.fused_ops=liger`).
- `chunked`: the plain-torch chunked linear cross-entropy (`finetune.kernels.chunked_loss`):
  runs on every device, never holds more than one chunk's logits.
- `unfused`: the model's head over the loss positions, then `F.cross_entropy` on the whole
  logits.

`auto` takes Liger's where it runs and passes its self-check, else the chunked one, else the
unfused one. Each candidate carries `loss(hidden, weight, bias, targets, ignore_index)` -> the
summed loss, which the self-check compares with the unfused reference
(`finetune.kernels.selfcheck.check_loss_head`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.kernels.chunked_loss import linear_cross_entropy
from finetune.kernels.fused_ops import liger_support
from finetune.kernels.registry import Candidate, ModelFacts, Registry, Support

# (hidden [N, H], weight [V, H], bias [V] | None, targets [N], ignore_index) -> summed loss.
HeadLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, int],
                    torch.Tensor]
# kernels.fused_linear_cross_entropy -> the candidate it asks for by name.
SETTING_TO_CANDIDATE: dict[str, str] = {"on": "liger", "chunked": "chunked", "off": "unfused"}


@dataclass(frozen=True)
class LossHeadCandidate(Candidate):
    """A loss-head candidate and the function its self-check runs."""

    loss: HeadLoss | None = None


def unfused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The reference: whole logits, then `F.cross_entropy` in fp32 (what the loss does
    without a fused head)."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,
                           ignore_index=ignore_index, reduction="sum")


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")
    return fused(weight, hidden, targets, bias)


def _everywhere(why: str) -> Callable[..., Support]:
    def supports(profile, facts: ModelFacts) -> Support:
        return True, why
    return supports


LOSS_HEAD: Registry[LossHeadCandidate] = Registry(
    "loss_head",
    [
        LossHeadCandidate("liger", liger_support, default_rank=0, loss=_liger_loss),
        LossHeadCandidate(
            "chunked", _everywhere("plain torch, one chunk of positions' logits at a time"),
            default_rank=1, loss=_chunked_loss),
        LossHeadCandidate("unfused", _everywhere("the whole logits, then F.cross_entropy"),
                          default_rank=2, loss=unfused_loss),
    ],
)


def loss_heads_for(registry: Registry[LossHeadCandidate], fused_ops: str,
                   liger_flce: tuple[bool, str]) -> Registry[LossHeadCandidate]:
    """`registry` adjusted to the run: Liger's loss is possible only with the Liger ops
    (`fused_ops` is the chosen fused_ops candidate), and `auto` skips it where
    `liger_flce` (from `flce_enabled`) says it is off."""
    adjusted = registry.copy()
    if "liger" not in registry:
        return adjusted
    liger = registry.get("liger")
    if fused_ops != "liger":
        def without(profile, facts: ModelFacts) -> Support:
            ok, why = liger.supports(profile, facts)
            return False, (why if not ok else f"needs kernels.fused_ops=liger (it is {fused_ops})")
        adjusted.register(dataclasses.replace(liger, supports=without), replace=True)
    elif not liger_flce[0]:
        adjusted.register(dataclasses.replace(liger, auto=False, not_auto_reason=liger_flce[1]),
                          replace=True)
    return adjusted


def setting_reason(reason: str, setting: str) -> str:
    """A selection's reason in the user's words: `kernels.fused_linear_cross_entropy=on`, not
    the candidate name (`=liger`) it asked for."""
    name = SETTING_TO_CANDIDATE.get(setting)
    key = "kernels.fused_linear_cross_entropy="
    return reason.replace(f"{key}{name}", f"{key}{setting}") if name else reason
