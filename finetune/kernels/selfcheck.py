"""Numerical self-checks run on the real machine before a kernel choice is trusted.

Attention: a tiny causal GQA forward + backward through the candidate's forward (the function
transformers calls for that attn_implementation), in the run's dtype and head_dim, compared
with an fp32 math reference. Optimizer: two steps against plain torch AdamW. Each check returns
None when it passes, else a one-line description of the failure; it never raises.
"""

from __future__ import annotations

from typing import Any

import torch

from finetune.kernels.attention import AttentionCandidate, default_scale
from finetune.kernels.kernel_plan import TORCH_DTYPES
from finetune.kernels.loss_head import LossHeadCandidate, unfused_loss
from finetune.kernels.optimizer import OptimizerBuilder, OptimizerCandidate
from finetune.kernels.registry import ModelFacts

# Max error relative to the reference's largest magnitude, per run dtype. Wrong masking or
# scaling gives errors of order 0.1-1; bf16 rounding stays below ~1e-2.
ATTENTION_TOLERANCE: dict[str, float] = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}
# The optimizer update must match plain AdamW to this fraction of how far the params moved.
OPTIMIZER_TOLERANCE = 1e-3
# Loss head: loss and gradients relative to the fp32 reference's largest magnitude. A chunk
# dropped or a wrong softmax moves them by order 1e-1 and more.
LOSS_HEAD_TOLERANCE: dict[str, float] = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}
SELFCHECK_BATCH = 2
SELFCHECK_SEQ = 64


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal GQA attention in plain fp32 math, written independently of the candidates."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    s = q.shape[-2]
    allowed = torch.arange(s, device=q.device)[:, None] >= torch.arange(s, device=q.device)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = torch.where(allowed, scores, torch.tensor(float("-inf"), device=q.device))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def _describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:200]}"


def check_attention(
    candidate: AttentionCandidate,
    facts: ModelFacts,
    device: str,
    *,
    backward: bool = True,
    seq: int = SELFCHECK_SEQ,
    batch: int = SELFCHECK_BATCH,
) -> str | None:
    """Run `candidate` once on `device` and compare it with the fp32 reference.

    `facts` must carry num_heads, num_kv_heads, head_dim and dtype. With `backward=False` only
    the forward is checked (for implementations that have no backward on this device). `seq`
    and `batch` size the check (scripts/gpu_check.py runs it at training lengths).
    Returns None on success, else why it failed.
    """
    if candidate.forward is None:
        return f"{candidate.name} has no forward to check"
    assert facts.num_heads and facts.num_kv_heads and facts.head_dim and facts.dtype
    dtype = TORCH_DTYPES[facts.dtype]
    tolerance = ATTENTION_TOLERANCE[facts.dtype]
    gen = torch.Generator().manual_seed(0)
    b, s, d = batch, seq, facts.head_dim
    shapes = [(b, facts.num_heads, s, d), (b, facts.num_kv_heads, s, d), (b, facts.num_kv_heads, s, d)]
    inputs32 = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
    grad_out32 = torch.randn(shapes[0], generator=gen).to(device)
    scale = default_scale(d)
    try:
        inputs = [x.to(dtype).requires_grad_(backward) for x in inputs32]
        out = candidate.forward(*inputs, scale)
        if tuple(out.shape) != shapes[0]:
            return f"{candidate.name} returned shape {tuple(out.shape)}, expected {shapes[0]}"
        if backward:
            out.backward(grad_out32.to(dtype))
    except Exception as exc:  # any failure of a kernel means: do not use it
        return f"{candidate.name} raised {_describe(exc)}"
    ref_inputs = [x.detach().requires_grad_(backward) for x in inputs32]
    ref = _reference_attention(*ref_inputs, scale)
    checks = [("output", out, ref)]
    if backward:
        ref.backward(grad_out32)
        for name, x, r in zip(("dq", "dk", "dv"), inputs, ref_inputs, strict=True):
            if x.grad is None:
                return f"{candidate.name} produced no {name}"
            assert r.grad is not None
            checks.append((name, x.grad, r.grad))
    for name, got, want in checks:
        error = _relative_error(got, want)
        if not error <= tolerance:
            return (
                f"{candidate.name} {name} max relative error {error:.3g} > {tolerance:g} "
                f"({facts.dtype}, head_dim {d})"
            )
    return None


def _two_steps(build: OptimizerBuilder, init: list[torch.Tensor], grads: list[torch.Tensor],
               device: str) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    optimizer = build(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for _ in range(2):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone().to(device)
        optimizer.step()
    return [p.detach().float().cpu() for p in params]


def check_optimizer(candidate: OptimizerCandidate, device: str) -> str | None:
    """Two AdamW steps with `candidate` vs plain torch AdamW; None when they agree."""
    if candidate.build is None:
        return f"{candidate.name} has no builder to check"
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16,)]
    init = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [torch.randn(shape, generator=gen) for shape in shapes]

    def reference(params: list[torch.nn.Parameter], **hp: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, foreach=False, fused=False, **hp)

    try:
        got = _two_steps(candidate.build, init, grads, device)
    except Exception as exc:
        return f"{candidate.name} raised {_describe(exc)}"
    want = _two_steps(reference, init, grads, "cpu")
    moved = max((w - i).abs().max().item() for w, i in zip(want, init, strict=True))
    error = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    if not error <= OPTIMIZER_TOLERANCE * moved:
        return (
            f"{candidate.name} differs from torch AdamW by {error:.3g} after 2 steps "
            f"(update size {moved:.3g})"
        )
    return None


def check_loss_head(candidate: LossHeadCandidate, device: str, dtype: str | None) -> str | None:
    """The candidate's summed linear cross-entropy and its gradients (hidden states and a
    trainable head weight), in the run's dtype, vs the unfused fp32 path; some positions are
    ignored (-100). None when they agree."""
    if candidate.loss is None:
        return f"{candidate.name} has no loss to check"
    name = dtype or "fp32"
    tolerance = LOSS_HEAD_TOLERANCE[name]
    gen = torch.Generator().manual_seed(0)
    hidden32 = torch.randn(96, 32, generator=gen)
    weight32 = torch.randn(512, 32, generator=gen) * 0.2
    targets = torch.randint(0, 512, (96,), generator=gen)
    targets[::5] = -100
    try:
        hidden = hidden32.to(device, TORCH_DTYPES[name], copy=True).requires_grad_()
        weight = weight32.to(device, TORCH_DTYPES[name], copy=True).requires_grad_()
        loss = candidate.loss(hidden, weight, None, targets.to(device), -100)
        loss.backward()
    except Exception as exc:  # any failure of a kernel means: do not use it
        return f"{candidate.name} raised {_describe(exc)}"
    ref_hidden = hidden32.clone().requires_grad_()
    ref_weight = weight32.clone().requires_grad_()
    reference = unfused_loss(ref_hidden, ref_weight, None, targets, -100)
    reference.backward()
    checks = [("loss", loss.reshape(()).cpu(), reference.detach()),
              ("grad of the hidden states", hidden.grad, ref_hidden.grad),
              ("grad of the head weight", weight.grad, ref_weight.grad)]
    for what, got, want in checks:
        if got is None:
            return f"{candidate.name} produced no {what}"
        assert want is not None
        error = _relative_error(got.cpu(), want)
        if not error <= tolerance:
            return f"{candidate.name} {what} max relative error {error:.3g} > {tolerance:g} ({name})"
    return None
