"""Loss normalisation over a whole gradient-accumulation window.

Each micro-batch's summed token loss is divided by the number of trained tokens in the *whole*
window (across every micro-batch and every rank), not averaged per micro-batch. So 1×8 and
4×2 micro-batching give the same gradients, whatever the padding or document lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """A loss with extra metrics. Each metric is normalised like the loss (divided by the
    window's `num_items`), so summing it over a window's micro-batches gives the window mean."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# loss_fn(model, batch, num_items) -> that micro-batch's summed loss divided by num_items, as a
# tensor or a LossOutput. Recipes' extra models are bound to it as keyword arguments.
LossFn = Callable[..., "torch.Tensor | LossOutput"]


@dataclass
class WindowLoss:
    """One accumulation window on this rank: the summed token loss and the summed metrics, as
    0-d tensors on the model's device, so reading them is one host sync for the whole step."""

    loss_sum: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for the window sums (the same figure a host-side Python float gives), float32
    where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def trained_tokens(batch: dict) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(model: torch.nn.Module, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over trained tokens, divided by `num_items`.

    Uses the model's own loss path (`num_items_in_batch`), so fused-loss patches such as Liger's
    fused linear cross-entropy apply and the full logits need not be kept in memory twice.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, labels=batch["labels"], num_items_in_batch=num_items, use_cache=False)
    return out.loss


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[dict], loss_fn: LossFn,
                         *, window_tokens: int, backward: Callable[[torch.Tensor], None],
                         grad_scale: float = 1.0,
                         no_sync: Callable[[], object] | None = None) -> WindowLoss:
    """Run forward+backward over a window; return its summed token loss and metrics here.

    `window_tokens` is the trained-token count of the whole window (all ranks). `grad_scale`
    undoes the averaging of a data-parallel wrapper (the world size under DDP). `no_sync`, when
    given, is a context factory that skips gradient synchronisation for all but the last
    micro-batch.
    """
    denominator = torch.tensor(float(max(window_tokens, 1)))
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        context = no_sync() if (no_sync is not None and not last) else nullcontext()
        with context:
            out = loss_fn(model, batch, denominator)
            loss = out.loss if isinstance(out, LossOutput) else out
            backward(loss * grad_scale)
        dtype = accumulation_dtype(loss.device)
        term = loss.detach().to(dtype) * float(denominator)
        total = term if total is None else total + term
        if isinstance(out, LossOutput):
            for name, value in out.metrics.items():
                value = torch.as_tensor(value).detach().to(device=loss.device, dtype=dtype)
                metrics[name] = value if name not in metrics else metrics[name] + value
    assert total is not None, "a window has at least one micro-batch"
    return WindowLoss(total, metrics)

