"""Numerical parity of the fast paths against their references: loss_parity (a few training
steps per attention), liger (Liger on vs off), lora_forward (finetune's fused LoRA forward vs
peft's)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from .context import (
    Context,
    candidates,
    llama,
    peak_gib,
    plan_candidate,
    reset_peak,
    sync,
    unsupported,
    use_attention,
)
from .runner import Skip


def _train_losses(ctx: Context, model: Any, steps: int, seq: int, vocab: int) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, seq), generator=gen).to(ctx.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def section_loss_parity(ctx: Context, out: dict[str, Any]) -> None:
    shape = ctx.sizes.parity_model
    head_dim = shape[0] // shape[2]
    state = {k: v.clone() for k, v in llama(ctx, shape, "eager").state_dict().items()}
    losses: dict[str, list[float]] = {}
    out["unsupported"] = unsupported(ctx, head_dim=head_dim)
    for name, candidate in candidates(ctx, head_dim=head_dim).items():
        model = llama(ctx, shape, use_attention(ctx, candidate), state=state)
        losses[name] = _train_losses(ctx, model, ctx.sizes.parity_steps, ctx.sizes.parity_seq,
                                     shape[4])
        out[name] = {"losses": [round(x, 5) for x in losses[name]]}
        del model
    use_attention(ctx, plan_candidate(ctx))
    reference = losses.get("eager") or next(iter(losses.values()))
    for name, values in losses.items():
        out[name]["max_diff_vs_eager"] = max(abs(a - b) for a, b in zip(values, reference,
                                                                       strict=True))


def section_liger(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    from finetune.hardware.detect import distribution_version
    from finetune.kernels import apply_fused_ops
    from finetune.kernels.fused_ops import LIGER_OPS

    if distribution_version("liger-kernel") is None:
        raise Skip("liger-kernel is not installed")
    if not ctx.gpu:
        raise Skip("Liger's Triton kernels need a GPU")
    shape = ctx.sizes.parity_model
    attn = ctx.plan.attn_implementation
    state = {k: v.clone() for k, v in llama(ctx, shape, attn).state_dict().items()}
    ids = torch.randint(0, shape[4], (2, ctx.sizes.parity_seq), device=ctx.device)
    results = {}
    for fused in (False, True):
        model = llama(ctx, shape, attn, state=state)
        out["ops"] = apply_fused_ops(model, LIGER_OPS) if fused else []
        reset_peak(ctx)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(ctx)
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results[fused] = (loss.item(), grads, peak_gib(ctx))
        del model
    (loss_off, g_off, mem_off), (loss_on, g_on, mem_on) = results[False], results[True]
    out.update({"loss_off": loss_off, "loss_on": loss_on, "loss_diff": abs(loss_on - loss_off),
                "grad_max_rel_error": ((g_on - g_off).abs().max() / g_off.abs().max()).item(),
                "grad_cosine": torch.nn.functional.cosine_similarity(g_on, g_off, dim=0).item(),
                "peak_gib_off": mem_off, "peak_gib_on": mem_on})


def section_lora_forward(ctx: Context, out: dict[str, Any]) -> None:
    """finetune's fused LoRA forward against peft's on the parity model (LoRA r=16 on every
    linear layer, non-zero B): loss, gradients, forward + backward time and peak memory."""
    from contextlib import nullcontext

    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.kernels import apply_lora_kernel

    shape = ctx.sizes.parity_model
    attn = ctx.plan.attn_implementation
    state = {k: v.clone() for k, v in llama(ctx, shape, attn).state_dict().items()}
    ids = torch.randint(0, shape[4], (2, ctx.sizes.parity_seq), device=ctx.device)
    autocast = (torch.autocast(ctx.device, dtype=ctx.dtype) if ctx.dtype != torch.float32
                else nullcontext())
    results = {}
    for choice in ("peft", "fused"):
        model = get_peft_model(llama(ctx, shape, attn, state=state),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                               autocast_adapter_dtype=True)
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        out[f"{choice}_layers"] = apply_lora_kernel(model, choice)
        times = []
        reset_peak(ctx)
        for _ in range(ctx.sizes.parity_steps + 2):
            model.zero_grad(set_to_none=True)
            sync(ctx)
            start = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            sync(ctx)
            times.append(time.perf_counter() - start)
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()
                           if p.requires_grad])
        results[choice] = (loss.item(), grads, statistics.median(times[2:]), peak_gib(ctx))
        del model
    (loss_peft, g_peft, t_peft, mem_peft), (loss_fused, g_fused, t_fused, mem_fused) = (
        results["peft"], results["fused"])
    out.update({"loss_peft": loss_peft, "loss_fused": loss_fused,
                "loss_diff": abs(loss_fused - loss_peft),
                "grad_cosine": torch.nn.functional.cosine_similarity(g_fused, g_peft, dim=0).item(),
                "step_s_peft": round(t_peft, 5), "step_s_fused": round(t_fused, 5),
                "speedup": round(t_peft / t_fused, 3),
                "peak_gib_peft": mem_peft, "peak_gib_fused": mem_fused})
