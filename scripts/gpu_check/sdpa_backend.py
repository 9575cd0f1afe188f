"""sdpa_backend: the SDPA backend that ran (unmasked, and with a 4D mask) through the plan's
routing, against the backend the plan claimed."""

from __future__ import annotations

from typing import Any

from .context import AttentionStub, Context, candidates, plan_candidate, use_attention


def op_recorder() -> Any:
    """A dispatch mode recording the aten ops that run below autograd (which SDPA kernel ran)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return Recorder()


def backend_of(ops: list[str]) -> str:
    """flash | efficient | cudnn | overrideable | math, from the aten ops of one SDPA call."""
    for marker, backend in (("_cudnn_attention", "cudnn"), ("_flash_attention", "flash"),
                            ("_efficient_attention", "efficient"),
                            ("_fused_attention_overrideable", "overrideable")):
        if any(marker in op for op in ops):
            return backend
    return "math"


def observed_sdpa_backend(ctx: Context, seq: int, heads: tuple[int, int, int],
                          masked: bool) -> str:
    """The backend transformers' (routed) sdpa function runs for a causal training call."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    n_heads, kv_heads, dim = heads
    module = AttentionStub(n_heads // kv_heads)
    q = torch.randn(1, n_heads, seq, dim, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, dim, device=ctx.device, dtype=ctx.dtype,
                        requires_grad=True) for _ in range(2))
    mask = (torch.ones(seq, seq, dtype=torch.bool, device=ctx.device).tril()[None, None]
            if masked else None)
    with op_recorder() as recorder:
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=dim ** -0.5)
        out.float().sum().backward()
    return backend_of(recorder.ops)


def section_sdpa_backend(ctx: Context, out: dict[str, Any]) -> None:
    from finetune.kernels import ModelFacts
    from finetune.kernels.attention import attention_details

    heads = ctx.sizes.check_heads
    facts = ModelFacts(*heads, dtype=ctx.plan.precision)
    for name, candidate in candidates(ctx, head_dim=heads[2]).items():
        if candidate.transformers_name != "sdpa":
            continue
        use_attention(ctx, candidate)
        claimed = attention_details(ctx.profile, candidate, facts)
        entry = out.setdefault(name, {})
        for masked, key in ((False, "sdpa_backend"), (True, "sdpa_backend_masked")):
            ran = observed_sdpa_backend(ctx, 256, heads, masked)
            entry[key] = {"claimed": claimed[key], "ran": ran, "match": ran == claimed[key]}
    use_attention(ctx, plan_candidate(ctx))
