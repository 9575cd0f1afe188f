"""The `fused` LoRA linear: the adapter's update added inside the frozen projection's output.

peft computes a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the
low-rank product, the scaling and the sum are three passes over a tensor of the projection's
output size, and backward adds one more (the scaling of the incoming gradient). Here the
product is accumulated straight into the projection's output with one `addmm_(..., alpha=
scaling)`: the scaling lands on the rank-r operands, the output is written once. The result is
the same sum (rounded once instead of twice) with the same parameters, state dict and saved
adapter; only the forward of the module changes.

A layer takes the fused path only for what peft's plain forward would do with one adapter:
no DoRA or other variant, no LoRA bias, not merged, adapters enabled, no per-call adapter
names, and either autocast or the adapter's own dtype. Anything else, and any layer whose
parameters DeepSpeed ZeRO-3 partitions (they are gathered only for a module that is called),
runs peft's forward unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # DeepSpeed ZeRO-3 placeholder, gathered per module call


def _plain(layer: Any) -> bool:
    """Plain LoRA on every adapter of `layer`: no variant (DoRA, ...) and no LoRA bias. Layers of
    peft releases that predate `lora_variant` (huggingface/peft#2443) keep peft's forward."""
    variants = getattr(layer, "lora_variant", None)
    return (variants is not None and not variants
            and all(b.bias is None for b in layer.lora_B.values()))


def fused_lora_forward(layer: Any, x: torch.Tensor, *args: Any,
                       **kwargs: Any) -> torch.Tensor | None:
    """The fused forward of a peft `lora.Linear` over an `nn.Linear`, or None where peft's own
    forward must run instead (see the module docstring)."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    weight_b = lora_b.weight
    if lora_b.bias is not None or _is_partitioned(weight_b):
        return None
    if x.dtype != lora_a.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # peft casts the input to the adapter's dtype and back; keep its path
    flat = x.reshape(-1, x.shape[-1])
    out = layer.base_layer(flat)
    low_rank = lora_a(layer.lora_dropout[name](flat))
    # An in-place op is not autocast: B meets the product in the dtype autocast gave it.
    out.addmm_(low_rank.to(out.dtype), weight_b.t().to(out.dtype), alpha=layer.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def fused_lora_class() -> type:
    """peft's `lora.Linear` with the fused forward (peft is imported on first use only)."""
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """peft's LoRA linear whose forward adds the low-rank update inside the projection's
        output (`fused_lora_forward`), falling back to peft's forward where that does not
        apply."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            fused = fused_lora_forward(self, x, *args, **kwargs)
            return super().forward(x, *args, **kwargs) if fused is None else fused

    FusedLoraLinear.__qualname__ = FusedLoraLinear.__name__
    return FusedLoraLinear


def fuse_lora_layers(model: torch.nn.Module) -> tuple[int, int]:
    """Give every plain peft `lora.Linear` over an `nn.Linear` in `model` the fused forward, in
    place (the module's class changes; parameters, hooks and state dict stay). Returns (layers
    fused, LoRA layers left to peft's forward: other base layers such as bitsandbytes' 4-bit
    ones, embeddings, DoRA, a LoRA bias)."""
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError:
        return 0, 0
    fused_class = fused_lora_class()
    fused = other = 0
    for module in model.modules():
        if type(module) is Linear and type(module.base_layer) is torch.nn.Linear and _plain(module):
            module.__class__ = fused_class
            fused += 1
            continue
        if isinstance(module, LoraLayer) and not isinstance(module, fused_class):
            other += 1
    return fused, other
