"""Loss normalisation over a whole gradient-accumulation window.

Each micro-batch's summed token loss is divided by the number of trained tokens in the *whole*
window (across every micro-batch and every rank), not averaged per micro-batch. So 1×8 and
4×2 micro-batching give the same gradients, whatever the padding or document lengths.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from finetune.data.collate import LOSS_POSITIONS
from finetune.kernels.chunked_loss import chunked_head_of, request_loss

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

    The LM head runs only at the positions that predict a trained token (transformers'
    `logits_to_keep` with those positions, shared by the batch's rows): with the loss on
    assistant tokens, prompts, padding and the last token of each example cost no vocabulary
    projection and hold no logits, which is most of a large vocabulary's share of a step. The
    collator computed those positions on the host (`loss_positions`), so choosing them reads
    nothing back from the device; a batch without them has them found here (`nonzero`, a
    device sync on a GPU). With the chunked loss head (`kernels.fused_linear_cross_entropy`,
    finetune.kernels.chunked_loss) the head returns the summed loss of those positions
    instead of their logits, so not even those logits are held at once. A model whose forward
    was replaced (Liger's fused linear
    cross-entropy, which never materialises logits) or that takes no `logits_to_keep` computes
    the loss on its own path (`num_items_in_batch`).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_POSITIONS)}
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = None
    if selects_logits(model):
        keep = batch.get(LOSS_POSITIONS)
        if keep is None:
            keep = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).flatten()
    if keep is None or keep.numel() == 0:
        out = model(**inputs, labels=labels, num_items_in_batch=num_items, use_cache=False)
        return out.loss
    head = chunked_head_of(model)
    if head is not None:
        with request_loss(head, targets[:, keep], "sum", IGNORE_INDEX):
            return model(**inputs, logits_to_keep=keep, use_cache=False).logits / num_items
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum") / num_items


_SELECTS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def selects_logits(model: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` may ask `model` (wrapped by DDP, FSDP, DeepSpeed or peft) for
    the logits of chosen positions: its transformers model takes `logits_to_keep` and its
    forward is the class's own (not replaced by a fused loss)."""
    found = _SELECTS.get(model)
    if found is None:
        inner = model
        for _ in range(8):  # DDP / DeepSpeed .module, peft base_model(.model)
            if hasattr(inner, "get_base_model"):
                inner = inner.get_base_model()
            elif isinstance(getattr(inner, "module", None), torch.nn.Module):
                inner = inner.module
            else:
                break
        forward = type(inner).forward
        found = ("forward" not in vars(inner)
                 and "logits_to_keep" in inspect.signature(forward).parameters)
        _SELECTS[model] = found
    return found


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
    items = float(max(window_tokens, 1))
    denominator = torch.tensor(items)
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
        term = loss.detach().to(dtype) * items
        total = term if total is None else total + term
        if isinstance(out, LossOutput):
            for name, value in out.metrics.items():
                value = torch.as_tensor(value).detach().to(device=loss.device, dtype=dtype)
                metrics[name] = value if name not in metrics else metrics[name] + value
    assert total is not None, "a window has at least one micro-batch"
    return WindowLoss(total, metrics)

