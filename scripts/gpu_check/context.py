"""What the sections share: the checkout on sys.path, the shapes, the machine and its plan,
the attention candidates, and a random-init Llama of a given shape."""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


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


@dataclass(frozen=True)


class Sizes:
    """Shapes of every section; `GPU` for a real run, `CPU` for --dry-run."""

    # step, syncs, op_profile: (hidden, intermediate, layers, heads, kv_heads, vocab)
    step_model: tuple[int, int, int, int, int, int]
    step_seq: int  # tokens per packed row
    step_rows: int
    step_docs: int  # documents per row (about)
    step_steps: int  # timed optimizer steps per attention
    small_step_layers: int  # the step model's layers in the resume and fsdp2 sections
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


# Llama 3 8B has 32 layers; 16 keep a step near 0.15 s on an H100 and every attention's ten
# steps inside the step section's budget. The step section reports both numbers.
LLAMA3_8B_LAYERS = 32
GPU = Sizes(step_model=(4096, 14336, 16, 32, 8, 128_256), step_seq=2048, step_rows=2, step_docs=8,
            step_steps=10, small_step_layers=2,
            leak=(512, 2, 8, 4, 1024), leak_docs=(300, 700, 1000),
            memory_model=(2048, 2, 16, 8, 4096), memory_seqs=(4096, 8192), gemm=8192,
            parity_model=(1024, 4, 8, 4, 4096), parity_seq=1024, parity_steps=3,
            adamw_numel=16_000_000, adamw_steps=20, check_heads=(16, 8, 128), check_seq=2048,
            masked_seq=2112, lora_seq=2048, lora_steps=40)
CPU = Sizes(step_model=(64, 128, 2, 4, 2, 256), step_seq=128, step_rows=1, step_docs=8,
            step_steps=1, small_step_layers=1,
            leak=(64, 2, 4, 2, 128), leak_docs=(7, 13, 20), memory_model=(64, 1, 4, 2, 128),
            memory_seqs=(64, 128), gemm=256, parity_model=(64, 2, 4, 2, 128), parity_seq=32,
            parity_steps=2, adamw_numel=4096, adamw_steps=3, check_heads=(4, 2, 32),
            check_seq=64, masked_seq=192, lora_seq=256, lora_steps=3)


@dataclass


class Context:
    """What the sections share: the machine, its plan, the sizes and the run's device.
    `time_left` gives the seconds the running section may still use (for a subprocess)."""

    args: argparse.Namespace
    sizes: Sizes
    device: str
    dtype: Any  # torch dtype of the run
    profile: Any = None
    plan: Any = None  # the auto plan for whole rows
    packed_plan: Any = None  # and for packed rows
    pythonpath: str = str(ROOT)
    time_left: Callable[[], float] = field(default=lambda: 60.0)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """A collated batch on `device`."""
    # a flex BlockMask has .to() too; sequence lengths computed on the host stay ints
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


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
    ranked = sorted(ATTENTION.ranked(ctx.profile, packing),
                    key=lambda c: c.name == "flex_attention")
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


def plan_candidate(ctx: Context) -> Any:
    """The plan's attention candidate."""
    from finetune.kernels import ATTENTION

    return ATTENTION.get(ctx.plan.choice("attention"))


def packed_candidate(ctx: Context) -> Any:
    """The attention candidate the plan chooses for packed rows."""
    from finetune.kernels import ATTENTION

    return ATTENTION.get(ctx.packed_plan.choice("attention"))


class AttentionStub:
    """The attributes transformers' sdpa function reads from an attention module."""

    def __init__(self, groups: int) -> None:
        self.is_causal, self.num_key_value_groups, self.training = True, groups, True


def register_attention(attn: str) -> None:
    """Register finetune's own attention implementations with transformers, as loading a
    model through finetune does."""
    from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa
    from finetune.kernels.varlen_torch import VARLEN_ATTN, register_varlen_attn

    if attn == VARLEN_SDPA:
        register_varlen_sdpa()
    if attn == VARLEN_ATTN:
        register_varlen_attn()


def llama(ctx: Context, shape: tuple[int, int, int, int, int], attn: str, *,
          init_range: float = 0.02, state: dict | None = None) -> Any:
    """A random-init Llama of `shape` (hidden, layers, heads, kv_heads, vocab) in the run's
    dtype on the run's device; `state` loads given weights (same model for every attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    register_attention(attn)
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
