"""Prove the kernel plan on a real GPU: one run, under 6 minutes on one H200, one JSON report.

    python scripts/gpu_check.py [--out report.json] [--budget-s 340] [--skip-lora] [--no-doc]
    python scripts/gpu_check.py --dry-run       # CPU: every in-process section on tiny shapes

Runs unchanged on NVIDIA (CUDA) and AMD (ROCm); a check that does not apply to the machine is
reported as "skipped: <why>" and listed under "skipped". Works from a fresh clone with or without
`pip install -e .`. Every section has a hard time budget and keeps what it measured before the
budget ran out. On a real GPU the report is also appended, dated, to docs/hardware-validation.md.

Sections, in order:
  versions      torch, CUDA/ROCm, cuDNN, flash-attn distributions, Liger, bitsandbytes, ...
  plan          the detected profile and the auto plan for whole and packed rows; the plan's
                environment is applied before this script's first SDPA call
  sdpa_backend  the SDPA backend that ran (unmasked, and with a 4D mask) through the plan's
                routing, against the backend the plan claimed
  leak          per attention path that packs: each document's logits and gradients inside a
                packed batch (the project's own collator) equal the document run alone
  memory        peak memory per attention implementation at 4k and 8k tokens (MATH shows here)
  gemm          a bf16 8192^3 matmul in TFLOP/s against the profile's peak
  loss_parity   a few training steps per attention implementation from the same seed
  liger         Liger on vs off: loss, gradients and peak memory
  lora_forward  finetune's fused LoRA forward vs peft's: loss, gradients, step time, memory
  adamw         fused vs foreach AdamW parameters over N steps, fp32 and fp16 + GradScaler
  tf32          the TF32 state after the plan's environment is applied, against the plan
  selfcheck     the attention self-checks at seq 2048, head_dim 128, and a masked call at
                seq % 128 == 64 (pytorch/pytorch#196678)
  lora          `finetune run lora_sft` of a ~1B Llama (random init, no download), packed,
                seq 2048: tokens/s, MFU against the profile's peak, peak memory
  multi_gpu     with 2+ GPUs: an all-reduce and a `--nproc 2` run
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VALIDATION_DOC = ROOT / "docs" / "hardware-validation.md"
BUDGET_S = 340.0
# Seconds per section on a GPU (half that with --dry-run).
SECTION_BUDGETS: dict[str, float] = {
    "versions": 5, "plan": 25, "sdpa_backend": 10, "leak": 30, "memory": 30, "gemm": 10,
    "loss_parity": 25, "liger": 25, "lora_forward": 20, "adamw": 15, "tf32": 2, "selfcheck": 20,
    "lora": 120, "multi_gpu": 90,
}
FLASH_DISTRIBUTIONS = ("flash-attn", "flash-attn-3", "flash-attn-4")
OTHER_DISTRIBUTIONS = ("liger-kernel", "bitsandbytes", "triton", "pytorch-triton-rocm",
                       "transformers", "accelerate", "peft", "deepspeed")


def shadow_package(root: Path, dest: Path) -> Path:
    """The installed layout of `root`'s package under `dest`: dest/finetune holds links to
    root/finetune's entries plus configs/ and recipes/, which pyproject ships inside the
    package as finetune.configs and finetune.recipes. Returns `dest` (a sys.path entry)."""
    package = dest / "finetune"
    package.mkdir(parents=True)
    for entry in (root / "finetune").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "configs").symlink_to(root / "configs")
    (package / "recipes").symlink_to(root / "recipes")
    return dest


def finetune_pythonpath() -> str:
    """Make `finetune` importable from this checkout, installed or not, and return the
    PYTHONPATH entry child processes (`finetune run`, torchrun) need."""
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("finetune.configs") is not None:
        return str(ROOT)  # an editable install (or ROOT itself) provides the layout
    shadow = shadow_package(ROOT, Path(tempfile.mkdtemp(prefix="finetune-clone-")))
    atexit.register(shutil.rmtree, shadow, ignore_errors=True)  # links only, never targets
    for name in [m for m in sys.modules if m == "finetune" or m.startswith("finetune.")]:
        del sys.modules[name]
    sys.path.insert(0, str(shadow))
    return str(shadow)


class Skip(Exception):
    """A section that does not apply to this machine; the message says why."""


class SectionTimeout(Exception):
    """A section ran past its budget."""


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in this (main) thread once `seconds` have passed. A running kernel
    is not interrupted; the exception arrives as soon as control returns to Python."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past its {seconds:.0f}s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The whole run's wall-clock budget; sections that would start too late are skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(report: dict[str, Any], name: str, budget: Budget, seconds: float,
                fn: Callable[[dict[str, Any]], None]) -> None:
    """Run `fn(results)` into report[name] with at most `seconds` (and what the run has left).

    `fn` fills `results` as it goes, so a failure or a timeout keeps what was measured. It
    raises Skip when the section does not apply here. Never raises.
    """
    results: dict[str, Any] = {}
    allowed = min(seconds, budget.left())
    if allowed < min(seconds, 5.0):
        report[name] = {"status": f"skipped: {budget.left():.0f}s of the run's budget left"}
        return
    started = time.monotonic()
    try:
        with hard_deadline(allowed):
            fn(results)
        status = "ok"
    except Skip as why:
        status = f"skipped: {why}"
    except SectionTimeout as why:
        status = f"timed out: {why} (partial results kept)"
    except Exception as exc:  # a section's failure is a finding, not the end of the run
        status = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        results["traceback"] = traceback.format_exc(limit=6)
    report[name] = {"status": status, **results,
                    "seconds": round(time.monotonic() - started, 1)}


@dataclass(frozen=True)
class Sizes:
    """Shapes of every section; `GPU` for a real run, `CPU` for --dry-run."""

    leak: tuple[int, int, int, int, int]  # hidden, layers, heads, kv_heads, vocab
    leak_docs: tuple[int, ...]
    memory_model: tuple[int, int, int, int, int]
    memory_seqs: tuple[int, ...]
    gemm: int
    parity_model: tuple[int, int, int, int, int]
    parity_seq: int
    parity_steps: int
    adamw_numel: int
    adamw_steps: int
    check_heads: tuple[int, int, int]  # heads, kv_heads, head_dim
    check_seq: int
    masked_seq: int  # seq % 128 == 64
    lora_seq: int
    lora_steps: int


GPU = Sizes(leak=(512, 2, 8, 4, 1024), leak_docs=(300, 700, 1000),
            memory_model=(2048, 2, 16, 8, 4096), memory_seqs=(4096, 8192), gemm=8192,
            parity_model=(1024, 4, 8, 4, 4096), parity_seq=1024, parity_steps=3,
            adamw_numel=16_000_000, adamw_steps=20, check_heads=(16, 8, 128), check_seq=2048,
            masked_seq=2112, lora_seq=2048, lora_steps=40)
CPU = Sizes(leak=(64, 2, 4, 2, 128), leak_docs=(7, 13, 20), memory_model=(64, 1, 4, 2, 128),
            memory_seqs=(64, 128), gemm=256, parity_model=(64, 2, 4, 2, 128), parity_seq=32,
            parity_steps=2, adamw_numel=4096, adamw_steps=3, check_heads=(4, 2, 32),
            check_seq=64, masked_seq=192, lora_seq=256, lora_steps=3)


@dataclass
class Context:
    """What the sections share: the machine, its plan, the sizes and the run's device."""

    args: argparse.Namespace
    sizes: Sizes
    device: str
    dtype: Any  # torch dtype of the run
    profile: Any = None
    plan: Any = None
    pythonpath: str = str(ROOT)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def sync(ctx: Context) -> None:
    import torch

    if ctx.gpu:
        torch.cuda.synchronize()


def reset_peak(ctx: Context) -> None:
    import torch

    if ctx.gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(ctx: Context) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if ctx.gpu else None


def candidates(ctx: Context, *, packing: bool = False, head_dim: int = 64) -> dict[str, Any]:
    """Attention candidates supported here, best first: name -> candidate (`unsupported`
    gives the others, with their reasons)."""
    from finetune.kernels import ATTENTION, ModelFacts

    facts = ModelFacts(8, 4, head_dim, dtype=ctx.plan.precision, packing=packing)
    # flex_attention compiles on first use of each shape, so it goes last: a section that
    # runs out of budget loses it, not the candidates after it.
    ranked = sorted(ATTENTION.ranked(ctx.profile, packing), key=lambda c: c.name == "flex_attention")
    return {c.name: c for c in ranked if c.supports(ctx.profile, facts)[0]}


def unsupported(ctx: Context, *, packing: bool = False, head_dim: int = 64) -> dict[str, str]:
    from finetune.kernels import ATTENTION, ModelFacts

    facts = ModelFacts(8, 4, head_dim, dtype=ctx.plan.precision, packing=packing)
    return {c.name: why for c in ATTENTION for ok, why in [c.supports(ctx.profile, facts)]
            if not ok}


def use_attention(ctx: Context, candidate: Any) -> str:
    """Route SDPA as the plan would for `candidate`; returns its attn_implementation."""
    from finetune.kernels import route_sdpa
    from finetune.kernels.sdpa import cudnn_policy

    route_sdpa(cudnn_policy(ctx.profile, candidate.name))
    return candidate.transformers_name


def llama(ctx: Context, shape: tuple[int, int, int, int, int], attn: str, *,
          init_range: float = 0.02, state: dict | None = None) -> Any:
    """A random-init Llama of `shape` (hidden, layers, heads, kv_heads, vocab) in the run's
    dtype on the run's device; `state` loads given weights (same model for every attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa

    if attn == VARLEN_SDPA:
        register_varlen_sdpa()
    hidden, layers, heads, kv_heads, vocab = shape
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4 if ctx.gpu else hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=16384, initializer_range=init_range)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=ctx.dtype)
    if state is not None:
        model.load_state_dict(state)
    return model


def section_versions(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    from finetune.hardware.detect import distribution_version, flash_attn_build

    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["rocm"] = torch.version.hip
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["flash_attn_distributions"] = {d: distribution_version(d) for d in FLASH_DISTRIBUTIONS}
    out["flash_attn_build"] = flash_attn_build()
    out["packages"] = {d: distribution_version(d) for d in OTHER_DISTRIBUTIONS}
    if ctx.gpu:
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def section_plan(ctx: Context, out: dict[str, Any]) -> None:
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.kernels import TORCH_DTYPES, ModelFacts, apply_env, format_plan_table, plan

    ctx.profile = detect()
    facts = ModelFacts(32, 8, 64)  # the lora section's model
    # plan() applies its environment before its self-checks, then apply_env applies it
    # (again), TF32 and the SDPA routing, before any SDPA call of this script.
    ctx.plan = plan(ctx.profile, KernelsConfig(), facts)
    out["env_applied"] = apply_env(ctx.plan)
    ctx.dtype = TORCH_DTYPES[ctx.plan.precision] if ctx.gpu else ctx.dtype
    packed = plan(ctx.profile, KernelsConfig(), facts, run_selfcheck=False, packing=True)
    out["plan"] = ctx.plan.to_dict()
    out["packed_attention"] = packed.kernels["attention"].to_dict()
    out["table"] = format_plan_table(ctx.plan).splitlines()


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
    module = _Attention(n_heads // kv_heads)
    q = torch.randn(1, n_heads, seq, dim, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, dim, device=ctx.device, dtype=ctx.dtype,
                        requires_grad=True) for _ in range(2))
    mask = (torch.ones(seq, seq, dtype=torch.bool, device=ctx.device).tril()[None, None]
            if masked else None)
    with op_recorder() as recorder:
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=dim ** -0.5)
        out.float().sum().backward()
    return backend_of(recorder.ops)


class _Attention:
    """The attributes transformers' sdpa function reads from an attention module."""

    def __init__(self, groups: int) -> None:
        self.is_causal, self.num_key_value_groups, self.training = True, groups, True


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
    use_attention(ctx, _plan_candidate(ctx))


def _plan_candidate(ctx: Context) -> Any:
    from finetune.kernels import ATTENTION

    return ATTENTION.get(ctx.plan.choice("attention"))


def _documents(ctx: Context, vocab: int) -> list[tuple[Any, Any]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [(rng.integers(1, vocab, n), np.ones(n, dtype=bool)) for n in ctx.sizes.leak_docs]


def _doc_loss(logits: Any, ids: Any, spans: list[tuple[int, int]]) -> Any:
    """Summed next-token cross-entropy of each document, never across a document boundary."""
    import torch.nn.functional as F

    return sum(F.cross_entropy(logits[0, s:e - 1].float(), ids[0, s + 1:e], reduction="sum")
               for s, e in spans)


def _forward_backward(model: Any, batch: dict[str, Any], spans: list[tuple[int, int]]):
    model.zero_grad(set_to_none=True)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    _doc_loss(logits, batch["input_ids"], spans).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return logits.detach().float(), grads


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}  # a flex BlockMask has .to() too


def section_leak(ctx: Context, out: dict[str, Any]) -> None:
    """Packed vs alone per attention path; the errors are set against a leaking run (all
    documents attending across boundaries) so a real leak cannot hide in rounding."""
    import torch

    from finetune.data.collate import Collator

    shape = ctx.sizes.leak
    docs = _documents(ctx, shape[4])
    lengths = [len(ids) for ids, _ in docs]
    spans = [(sum(lengths[:i]), sum(lengths[:i + 1])) for i in range(len(docs))]
    reference = llama(ctx, shape, "sdpa", init_range=0.1)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    use_attention(ctx, _plan_candidate(ctx))
    # The leaking run: one causal row over all documents (positions still restart per
    # document), through an explicit 4D mask, which transformers passes on unchanged.
    leaking = Collator(pad_id=0, isolation="varlen", mask_dtype=ctx.dtype)([docs])
    n = leaking["input_ids"].shape[1]
    causal = torch.full((n, n), torch.finfo(ctx.dtype).min).triu(1)
    leaking["attention_mask"] = causal[None, None].to(ctx.dtype)
    leak_logits, leak_grads = _forward_backward(reference, _to(leaking, ctx.device), spans)
    out["unsupported"] = unsupported(ctx, packing=True)
    for name, candidate in candidates(ctx, packing=True).items():
        if candidate.packing_isolation is None:
            continue
        model = llama(ctx, shape, use_attention(ctx, candidate), init_range=0.1, state=state)
        collate = Collator(pad_id=0, isolation=candidate.packing_isolation, mask_dtype=ctx.dtype)
        packed_logits, packed_grads = _forward_backward(model, _to(collate([docs]), ctx.device),
                                                        spans)
        alone_grads: dict[str, torch.Tensor] = {}
        logit_err = leak_err = 0.0
        for doc, (s, e) in zip(docs, spans, strict=True):
            single = Collator(pad_id=0, isolation=None, mask_dtype=ctx.dtype)([[doc]])
            logits, grads = _forward_backward(model, _to(single, ctx.device), [(0, e - s)])
            scale = logits.abs().max().item()
            logit_err = max(logit_err, (packed_logits[0, s:e] - logits[0]).abs().max().item() / scale)
            leak_err = max(leak_err, (leak_logits[0, s:e] - logits[0]).abs().max().item() / scale)
            for key, g in grads.items():
                alone_grads[key] = alone_grads.get(key, 0) + g
        grad_scale = max(g.abs().max().item() for g in alone_grads.values())
        grad_err = max((packed_grads[k] - g).abs().max().item() for k, g in alone_grads.items())
        grad_leak = max((leak_grads[k] - g).abs().max().item() for k, g in alone_grads.items())
        out[name] = {
            "isolation": candidate.packing_isolation,
            "logits_error": logit_err, "logits_error_if_leaking": leak_err,
            "grad_error": grad_err / grad_scale, "grad_error_if_leaking": grad_leak / grad_scale,
            # isolated errors must be a small fraction of what a leak produces
            "isolated": logit_err < 0.1 * leak_err and grad_err < 0.1 * grad_leak,
        }
        del model
    use_attention(ctx, _plan_candidate(ctx))


def section_memory(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    shape = ctx.sizes.memory_model
    head_dim = shape[0] // shape[2]
    out["unsupported"] = unsupported(ctx, head_dim=head_dim)
    for name, candidate in candidates(ctx, head_dim=head_dim).items():
        entry = out.setdefault(name, {})
        model = llama(ctx, shape, use_attention(ctx, candidate))
        for seq in ctx.sizes.memory_seqs:
            ids = torch.randint(0, shape[4], (1, seq), device=ctx.device)
            reset_peak(ctx)
            try:
                model(input_ids=ids, labels=ids).loss.backward()
                sync(ctx)
                entry[f"peak_gib_{seq}"] = peak_gib(ctx)
            except torch.cuda.OutOfMemoryError:
                entry[f"peak_gib_{seq}"] = "out of memory"
            model.zero_grad(set_to_none=True)
        peaks = [entry.get(f"peak_gib_{s}") for s in ctx.sizes.memory_seqs]
        if all(isinstance(p, float) for p in peaks) and len(peaks) == 2:
            # Fused attention grows linearly with seq; MATH (a silent fallback) quadratically.
            entry["growth_x2_seq"] = round(peaks[1] / peaks[0], 2)
        del model
    use_attention(ctx, _plan_candidate(ctx))


def section_gemm(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    n = ctx.sizes.gemm
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    for _ in range(3):
        a @ b
    sync(ctx)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync(ctx)
        times.append(time.perf_counter() - start)
    tflops = 2 * n**3 / statistics.median(times) / 1e12
    peak = ctx.profile.peak_bf16_tflops
    out.update({"n": n, "dtype": str(ctx.dtype), "tflops": round(tflops, 1), "peak_tflops": peak,
                "fraction_of_peak": round(tflops / peak, 3) if peak else None})


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
    use_attention(ctx, _plan_candidate(ctx))
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


def _adamw_run(ctx: Context, fused: bool, dtype: Any, scaler: bool) -> list[Any]:
    """Parameters after N AdamW steps on matmul losses (autocast in `dtype`; with a grad
    scaler, one step overflows on purpose and must be skipped alike)."""
    import torch

    torch.manual_seed(0)
    side = int((ctx.sizes.adamw_numel // 4) ** 0.5)
    params = [torch.nn.Parameter(torch.randn(side, side, device=ctx.device) * 0.02)
              for _ in range(4)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused,
                                  foreach=not fused)
    grad_scaler = torch.amp.GradScaler(ctx.device) if scaler else None
    gen = torch.Generator().manual_seed(1)
    for step in range(ctx.sizes.adamw_steps):
        x = torch.randn(16, side, generator=gen).to(ctx.device)
        with torch.autocast(ctx.device, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum((x @ p).float().pow(2).mean() for p in params)
        if scaler and step == 1:
            loss = loss * float("inf")
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().float() for p in params]


def section_adamw(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    cases = [("fp32", torch.float32, False), ("bf16_autocast", torch.bfloat16, False),
             ("fp16_grad_scaler", torch.float16, True)]
    for name, dtype, scaler in cases:
        fused = _adamw_run(ctx, True, dtype, scaler)
        foreach = _adamw_run(ctx, False, dtype, scaler)
        moved = max((p - q).abs().max().item() for p, q in zip(fused, foreach, strict=True))
        scale = max(p.abs().max().item() for p in foreach)
        out[name] = {"steps": ctx.sizes.adamw_steps, "max_abs_diff": moved,
                     "relative": moved / scale, "match": moved <= 1e-5 * max(scale, 1.0)}


def section_tf32(ctx: Context, out: dict[str, Any]) -> None:
    import torch

    precision = torch.get_float32_matmul_precision()
    out.update({
        "planned": ctx.plan.tf32,
        "reason": ctx.plan.kernels["precision"].details.get("tf32_reason"),
        "float32_matmul_precision": precision,
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "HIPBLASLT_ALLOW_TF32": os.environ.get("HIPBLASLT_ALLOW_TF32"),
        "consistent": (precision != "highest") == ctx.plan.tf32,
    })


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
        _Attention(1), a, b, c, m, scaling=dim ** -0.5)[0].transpose(1, 2))
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


def write_llama_folder(ctx: Context, folder: Path, seq: int) -> int:
    """A ~1B Llama-shaped model (Llama 3.2 1B's layout, the built-in tokenizer's vocabulary),
    random init, saved as an ordinary model folder. Returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    gpu = ctx.gpu
    config = LlamaConfig(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=2048 if gpu else 64,
        intermediate_size=8192 if gpu else 128, num_hidden_layers=16 if gpu else 2,
        num_attention_heads=32 if gpu else 4, num_key_value_heads=8 if gpu else 2,
        max_position_embeddings=max(seq, 2048), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def lora_command(model_dir: Path, out_dir: Path, seq: int, steps: int,
                 nproc: int = 1) -> list[str]:
    """The `finetune run lora_sft` command of the lora section."""
    command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft",
               f"model.name_or_path={model_dir}", "data.packing=true",
               f"data.max_seq_len={seq}", f"trainer.max_steps={steps}",
               "trainer.micro_batch_size=4", "trainer.eval_every_n_steps=0",
               "trainer.save_every_n_steps=0", "optim=adamw", f"output_dir={out_dir}"]
    return command + ([f"--nproc={nproc}"] if nproc > 1 else [])


def lora_results(run_dir: Path, warmup_steps: int = 3) -> dict[str, Any]:
    """Throughput, MFU and memory of a finished run, from its metrics.jsonl and summary.json
    (the first `warmup_steps` steps are left out of the medians)."""
    result: dict[str, Any] = {}
    plan_file = run_dir / "kernel_plan.json"
    if plan_file.exists():
        kernels = json.loads(plan_file.read_text())["kernels"]
        result["kernels"] = {k: v["choice"] for k, v in kernels.items()}
        result["attention_selfcheck"] = kernels["attention"].get("selfcheck")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [r for r in rows if "tokens_per_s" in r][warmup_steps:]
        result["steps_measured"] = len(steps)
        for key in ("tokens_per_s", "mfu", "step_time_s"):
            values = [r[key] for r in steps if r.get(key) is not None]
            result[f"median_{key}"] = statistics.median(values) if values else None
        losses = [r["loss"] for r in rows if "loss" in r] or [None]
        result["first_loss"], result["last_loss"] = losses[0], losses[-1]
    summary = run_dir / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        result["peak_memory_gb"] = data.get("peak_memory_gb")
        result["trained_tokens_per_s"] = data.get("trained_tokens_per_s")
    return result


def run_command(ctx: Context, command: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Run `command` with this checkout importable; (result, its stdout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ctx.pythonpath,
                                                       os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:  # the child is killed; what it wrote stays
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(
            errors="replace")
        result.update(returncode=None, timed_out_after_s=round(timeout, 1))
        return result, output
    result.update(returncode=proc.returncode, wall_s=round(time.monotonic() - started, 1))
    if proc.returncode != 0:
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result, proc.stdout


def section_lora(ctx: Context, out: dict[str, Any], time_left: Callable[[], float]) -> None:
    if ctx.args.skip_lora:
        raise Skip("--skip-lora")
    if ctx.args.dry_run:
        raise Skip("--dry-run (the command is built and its results parsed by a unit test)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_dir = Path(tmp) / "llama-1b", Path(tmp) / "run"
        out["parameters"] = write_llama_folder(ctx, model_dir, ctx.sizes.lora_seq)
        command = lora_command(model_dir, run_dir, ctx.sizes.lora_seq, ctx.sizes.lora_steps)
        out.update(run_command(ctx, command, max(time_left() - 5, 10))[0])
        out.update(lora_results(run_dir))
    if out["returncode"] != 0:  # None: timed out; the steps it logged are kept above
        raise RuntimeError(f"finetune run did not finish (exit status {out['returncode']})")


def allreduce_worker() -> int:
    """One rank of the multi_gpu all-reduce (started by torchrun); rank 0 prints the result."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")  # RCCL on ROCm
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((64 * 2**20,), float(rank + 1), device="cuda")  # 256 MiB of fp32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    correct = bool((x == world * (world + 1) / 2).all())
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    if rank == 0:
        # ring all-reduce bus bandwidth: 2 (n - 1) / n of the buffer per rank
        bus_gbps = x.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9
        print(json.dumps({"world_size": world, "correct": correct,
                          "bus_bandwidth_gb_s": round(bus_gbps, 1)}))
    dist.destroy_process_group()
    return 0


def section_multi_gpu(ctx: Context, out: dict[str, Any], time_left: Callable[[], float]) -> None:
    import torch

    count = torch.cuda.device_count() if ctx.gpu else 0
    if count < 2:
        raise Skip(f"needs 2+ GPUs; this machine has {count}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), "--allreduce-worker"]
    result, stdout = run_command(ctx, command, min(60.0, time_left() / 2))
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    out["allreduce"] = {**result, **(json.loads(lines[-1]) if lines else {})}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "finetune.cli", "run", "lora_sft", "trainer.max_steps=10",
                   f"output_dir={Path(tmp) / 'run'}", "--nproc=2"]
        out["nproc_2"] = run_command(ctx, command, max(time_left() - 5, 10))[0]
        out["nproc_2"].update(lora_results(Path(tmp) / "run", warmup_steps=1))


def skipped_checks(report: dict[str, Any]) -> list[str]:
    """Every check this machine skipped, with why: sections, and per-candidate refusals."""
    found = []
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        status = str(section.get("status", ""))
        if status.startswith("skipped"):
            found.append(f"{name}: {status.removeprefix('skipped: ')}")
        for candidate, why in (section.get("unsupported") or {}).items():
            found.append(f"{name}/{candidate}: {why}")
    return found


def validation_section(report: dict[str, Any], json_path: Path) -> str:
    """The dated Markdown section appended to docs/hardware-validation.md: what ran, and only
    figures this run measured."""
    hw = report["plan"].get("plan", {}).get("hardware", {})
    title = (f"### {report['date']}: {hw.get('name', 'unknown device')} ({hw.get('arch', '?')}), "
             f"torch {report['versions'].get('torch')}")
    lines = [title, "", f"Report: `{json_path.name}` (scripts/gpu_check.py, "
             f"{report['wall_s']:.0f} s).", "", "| section | status | figures |", "|---|---|---|"]
    figures = {
        "gemm": lambda s: f"{s.get('tflops')} TFLOP/s bf16 ({s.get('fraction_of_peak')} of peak)",
        "lora": lambda s: (f"{s.get('median_tokens_per_s')} tok/s, MFU {s.get('median_mfu')}, "
                           f"peak {s.get('peak_memory_gb')} GB"),
        "tf32": lambda s: f"planned {s.get('planned')}, consistent {s.get('consistent')}",
        "lora_forward": lambda s: (f"fused/peft step {s.get('speedup')}x, grad cosine "
                                   f"{s.get('grad_cosine')}, peak {s.get('peak_gib_fused')} vs "
                                   f"{s.get('peak_gib_peft')} GiB"),
    }
    for name, section in report.items():
        if isinstance(section, dict) and "status" in section:
            text = figures[name](section) if name in figures and section["status"] == "ok" else ""
            lines.append(f"| {name} | {section['status'][:80]} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the JSON report (default: gpu_check-DATE.json)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the in-process sections on CPU with tiny shapes; no doc")
    parser.add_argument("--skip-lora", action="store_true", help="skip the LoRA run")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not append to docs/hardware-validation.md")
    parser.add_argument("--doc", type=Path, default=VALIDATION_DOC, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pythonpath = finetune_pythonpath()
    if args.allreduce_worker:
        return allreduce_worker()

    import torch

    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        print("gpu_check: no CUDA/ROCm device here; use --dry-run to exercise the script on CPU",
              file=sys.stderr)
        return 2
    ctx = Context(args, GPU if on_gpu else CPU, "cuda" if on_gpu else "cpu",
                  torch.bfloat16 if on_gpu else torch.float32, pythonpath=pythonpath)
    scale = 1.0 if on_gpu else 0.5
    budget = Budget(args.budget_s)
    started = time.monotonic()
    date = datetime.date.today().isoformat()
    report: dict[str, Any] = {"date": date, "dry_run": args.dry_run}

    def section_clock(name: str) -> Callable[[], float]:
        """Seconds the section started now may still use (for a subprocess's timeout)."""
        end = time.monotonic() + min(SECTION_BUDGETS[name] * scale, budget.left())
        return lambda: end - time.monotonic()

    sections: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("versions", lambda out: section_versions(ctx, out)),
        ("plan", lambda out: section_plan(ctx, out)),
        ("sdpa_backend", lambda out: section_sdpa_backend(ctx, out)),
        ("leak", lambda out: section_leak(ctx, out)),
        ("memory", lambda out: section_memory(ctx, out)),
        ("gemm", lambda out: section_gemm(ctx, out)),
        ("loss_parity", lambda out: section_loss_parity(ctx, out)),
        ("liger", lambda out: section_liger(ctx, out)),
        ("lora_forward", lambda out: section_lora_forward(ctx, out)),
        ("adamw", lambda out: section_adamw(ctx, out)),
        ("tf32", lambda out: section_tf32(ctx, out)),
        ("selfcheck", lambda out: section_selfcheck(ctx, out)),
        ("lora", lambda out: section_lora(ctx, out, section_clock("lora"))),
        ("multi_gpu", lambda out: section_multi_gpu(ctx, out, section_clock("multi_gpu"))),
    ]
    for name, fn in sections:
        if ctx.plan is None and name not in ("versions", "plan"):
            report[name] = {"status": "skipped: no kernel plan (the plan section failed)"}
            continue
        run_section(report, name, budget, SECTION_BUDGETS[name] * scale, fn)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["skipped"] = skipped_checks(report)
    out_path = args.out or Path(f"gpu_check-{date}.json")
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: report written to {out_path} ({report['wall_s']:.0f} s)", file=sys.stderr)
    if on_gpu and not args.no_doc:
        with args.doc.open("a") as doc:
            doc.write("\n" + validation_section(report, out_path))
        print(f"gpu_check: appended a section to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
