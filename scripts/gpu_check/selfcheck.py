"""selfcheck: the attention self-checks at seq 2048, head_dim 128, and a masked call at
seq % 128 == 64 (pytorch/pytorch#196678) through the plan's routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .context import AttentionStub, Context, candidates, unsupported


def _masked_nan_case(ctx: Context, seq: int, dim: int) -> dict[str, Any]:
    """pytorch/pytorch#196678's inputs: a causal mask tensor, seq % 128 == 64, every logit
    ~ -120. Runs through the plan's routed sdpa; on NVIDIA also cuDNN alone, to show whether
    this machine's cuDNN has the bug the routing avoids."""
    import math

    import torch
    import torch.nn.functional as F
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, seq, dim, generator=gen) * 0.1
    k = torch.randn(1, 1, seq, dim, generator=gen) * 0.1
    v = torch.randn(1, 1, seq, dim, generator=gen)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(dim)
    grad_out = torch.randn(1, 1, seq, dim, generator=gen)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]

    def run(fn: Callable[..., Any]) -> tuple[Any, Any]:
        x = [t.detach().clone().to(ctx.device, ctx.dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*x, mask.to(ctx.device))
        out.backward(grad_out.to(ctx.device, ctx.dtype))
        return out.detach().float().cpu(), x[0].grad.float().cpu()

    ref_x = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_x, attn_mask=mask)
    ref.backward(grad_out.double())
    routed = run(lambda a, b, c, m: ALL_ATTENTION_FUNCTIONS["sdpa"](
        AttentionStub(1), a, b, c, m, scaling=dim ** -0.5)[0].transpose(1, 2))
    # grad_q itself is ill-conditioned here (every logit ~ -120), so only its finiteness is
    # checked; the forward is compared with the float64 reference.
    result = {"seq": seq, "head_dim": dim,
              "routed_grad_q_finite": bool(torch.isfinite(routed[1]).all()),
              "routed_output_rel_error": ((routed[0] - ref.detach()).abs().max()
                                          / ref.detach().abs().max()).item()}
    if ctx.profile.vendor != "nvidia":
        result["cudnn_alone"] = "skipped: cuDNN attention is NVIDIA-only"
        return result
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            raw = run(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m))
        result["cudnn_alone_grad_q_finite"] = bool(torch.isfinite(raw[1]).all())
    except RuntimeError as exc:
        result["cudnn_alone"] = f"cuDNN did not run it: {str(exc)[:200]}"
    return result


def section_selfcheck(ctx: Context, out: dict[str, Any]) -> None:
    from finetune.kernels import ModelFacts
    from finetune.kernels.selfcheck import check_attention

    heads, kv_heads, dim = ctx.sizes.check_heads
    facts = ModelFacts(heads, kv_heads, dim, dtype=ctx.plan.precision)
    out["seq"], out["head_dim"] = ctx.sizes.check_seq, dim
    out["unsupported"] = unsupported(ctx, head_dim=dim)
    for name, candidate in candidates(ctx, head_dim=dim).items():
        failure = check_attention(candidate, facts, ctx.device, seq=ctx.sizes.check_seq, batch=1)
        out[name] = "passed" if failure is None else f"failed: {failure}"
    out["masked_seq_mod_128_is_64"] = _masked_nan_case(ctx, ctx.sizes.masked_seq, dim)
