"""Model FLOPs of a training step, for MFU: the matmuls a decoder-only transformer needs per
token in this run's training mode, plus causal attention at the real (packed) document lengths.

Counted (multiply-add = 2 FLOPs), per token, forward: every weight matmul (q, k, v, o, the MLP
and the LM head); per document of n tokens: QK^T and AV over the n(n+1)/2 causal pairs. The LM
head is counted where it runs: at every token, or, when the loss asks the model for the logits
of chosen positions only (`logits_to_keep`, finetune.train.loss.causal_lm_loss), at those
positions in every row (`head_positions`). The
backward costs twice the forward where both the input and the weight gradient are needed (full
fine-tuning, the attention core, the adapters' own matmuls) and once the forward where only the
input gradient is (frozen weights under an adapter). Not counted: norms, activations, softmax,
the embedding lookup, activation-checkpointing recompute (model FLOPs, not hardware FLOPs).
docs/observability.md has the formula and the conventions it differs from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Model types whose MLP has two matrices (up, down) instead of three (gate, up, down).
_UNGATED_MLP = frozenset({"gpt_neox", "starcoder2", "phi", "gpt_bigcode", "gptj", "codegen"})
_MOE_KEYS = ("num_experts_per_tok", "num_local_experts", "num_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class TrainingMode:
    """What trains: every weight (`full`), or only the adapters, given as the (in_features,
    out_features, rank) of every adapted linear layer in the model (all layers)."""

    full: bool
    adapters: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of(cls, model: torch.nn.Module) -> TrainingMode:
        """Read the mode off a model: its active LoRA/DoRA layers (peft's `lora_A`/`lora_B`);
        a model without any trains every weight."""
        shapes = []
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b,
                                                                              torch.nn.ModuleDict):
                continue
            for name in getattr(module, "active_adapters", list(lora_a.keys())):
                if name in lora_a and name in lora_b:
                    a, b = lora_a[name], lora_b[name]
                    shapes.append((a.in_features, b.out_features, a.out_features))
        return cls(full=not shapes, adapters=tuple(shapes))


@dataclass(frozen=True)
class Architecture:
    """The shape facts the count needs, read from a transformers config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool

    @classmethod
    def from_config(cls, config: Any) -> Architecture | None:
        """None when the config is not a dense decoder with the usual attribute names
        (hidden_size, num_hidden_layers, ...) or is a mixture of experts, whose active FLOPs
        depend on routing details this count does not model: MFU is then unknown, not guessed."""
        get = lambda name: getattr(config, name, None)  # noqa: E731
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "vocab_size")
        if any(not isinstance(get(name), int) for name in needed):
            return None
        if any(get(key) for key in _MOE_KEYS):
            return None
        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   intermediate=get("intermediate_size"), vocab=get("vocab_size"),
                   gated_mlp=get("model_type") not in _UNGATED_MLP)

    def forward_weight_flops(self) -> int:
        """Forward FLOPs per token of every weight matmul (attention projections, MLP, LM head)."""
        return self.forward_body_flops() + self.forward_head_flops()

    def forward_body_flops(self) -> int:
        """Forward FLOPs per token of the decoder layers' weight matmuls (no LM head)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        return 2 * self.layers * (attention + mlp)

    def forward_head_flops(self) -> int:
        """Forward FLOPs of the LM head at one position (hidden -> vocabulary)."""
        return 2 * self.hidden * self.vocab

    def forward_attention_flops_per_pair(self) -> int:
        """Forward FLOPs of one causal (query, key) pair across all layers: QK^T and AV."""
        return 4 * self.heads * self.head_dim * self.layers


def flops_per_token(config: Any, mode: TrainingMode) -> float | None:
    """Training FLOPs per token outside the attention core (forward + backward), or None when
    the architecture is not counted (see `Architecture.from_config`).

    Full fine-tuning: 3 x forward (the backward computes input and weight gradients). Adapter
    runs: 2 x forward for the frozen weights (input gradients only) plus 6 r (in + out) per
    token for each adapted layer (its two small matmuls, forward and both gradients).
    """
    arch = Architecture.from_config(config)
    if arch is None:
        return None
    weights = arch.forward_weight_flops()
    if mode.full:
        return float(3 * weights)
    adapters = sum(6 * rank * (fan_in + fan_out) for fan_in, fan_out, rank in mode.adapters)
    return float(2 * weights + adapters)


def attention_flops(config: Any, doc_lengths: list[int]) -> float | None:
    """Training FLOPs (forward + backward = 3 x forward) of causal attention over documents of
    these lengths: each document attends only to itself, so the sum of n(n+1)/2 per document."""
    arch = Architecture.from_config(config)
    if arch is None:
        return None
    pairs = sum(n * (n + 1) // 2 for n in doc_lengths)
    return float(3 * arch.forward_attention_flops_per_pair() * pairs)


def head_flops(config: Any, mode: TrainingMode) -> float | None:
    """Training FLOPs of the LM head at one position (part of `flops_per_token`): 3 x forward
    in full fine-tuning, 2 x forward (input gradient only) under adapters."""
    arch = Architecture.from_config(config)
    if arch is None:
        return None
    return float((3 if mode.full else 2) * arch.forward_head_flops())


def step_flops(config: Any, mode: TrainingMode, doc_lengths: list[int],
               head_positions: int | None = None) -> float | None:
    """Model FLOPs of training on documents of these lengths (every micro-batch of a step);
    `head_positions`: where the LM head ran, when not at every token (`logits_to_keep`)."""
    per_token = flops_per_token(config, mode)
    attention = attention_flops(config, doc_lengths)
    head = head_flops(config, mode)
    if per_token is None or attention is None or head is None:
        return None
    tokens = sum(doc_lengths)
    skipped = 0 if head_positions is None else tokens - head_positions
    return per_token * tokens - head * skipped + attention


def loss_head_positions(batch: dict) -> int:
    """Positions at which a loss with `logits_to_keep` runs the LM head on a CPU batch: the
    positions whose next token some row trains on (`loss_positions` when the collator gave
    them), in every row (transformers keeps the same positions for each row)."""
    labels = batch["labels"]
    keep = batch.get("loss_positions")
    count = (int(keep.numel()) if isinstance(keep, torch.Tensor)
             else int((labels[:, 1:] != -100).any(dim=0).sum()))
    return count * int(labels.shape[0])


def document_lengths(batch: dict) -> list[int]:
    """The lengths of the documents in a collated batch, read from its CPU tensors.

    A document starts where `position_ids` restart at 0 (packed rows hold several); padding
    marked by a 2D attention_mask is left out. The padding tail of a packed row (no 2D mask)
    counts as one more short document, as the model computes it. Raises ValueError for a
    batch on an accelerator, because reading it would wait for the device.
    """
    positions = batch.get("position_ids")
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    if ids.device.type != "cpu":
        raise ValueError("document_lengths needs the batch before it moves to the device "
                         "(reading device tensors would synchronise)")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        # Unpacked rows: one document per row, right-padded.
        return [int(n) for n in mask.sum(dim=1).tolist() if n > 0]
    if positions is None:
        return [int(ids.shape[1])] * int(ids.shape[0])
    lengths: list[int] = []
    for row in positions:
        bounds = torch.nonzero(row == 0).flatten().tolist() + [int(row.shape[0])]
        lengths.extend(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)
                       if end > start)
    return lengths


class FlopCounter:
    """Per-step model FLOPs for one model and training mode; the architecture is read once.

    `head_at_loss_positions`: the loss runs the LM head only where it reads logits
    (`logits_to_keep`, see `loss_head_positions`), so the head is counted there, not at every
    token."""

    def __init__(self, config: Any, mode: TrainingMode, *,
                 head_at_loss_positions: bool = False) -> None:
        self.per_token = flops_per_token(config, mode)
        arch = Architecture.from_config(config)
        self._per_pair = 3 * arch.forward_attention_flops_per_pair() if arch else None
        self._per_head = head_flops(config, mode)
        self.head_at_loss_positions = head_at_loss_positions

    @property
    def known(self) -> bool:
        return self.per_token is not None

    def step(self, micro_batches: list[dict]) -> float | None:
        """FLOPs of one optimizer step over these CPU micro-batches; None when not counted."""
        if self.per_token is None or self._per_pair is None:
            return None
        total = 0.0
        for batch in micro_batches:
            lengths = document_lengths(batch)
            tokens, pairs = sum(lengths), sum(n * (n + 1) // 2 for n in lengths)
            total += self.per_token * tokens + self._per_pair * pairs
            if self.head_at_loss_positions and self._per_head is not None and "labels" in batch:
                total -= self._per_head * (tokens - loss_head_positions(batch))
        return total
