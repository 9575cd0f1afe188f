"""syncs: host-device synchronisations per optimizer step of the step section's model (the
plan's attention and LoRA kernel), counted under `torch.cuda.set_sync_debug_mode("warn")`, each
with its call site: the frame that asked, and the nearest frame in finetune, transformers, peft
or accelerate. The trainer means to read the device once per step (loss and gradient norm);
every other site listed is a stall to remove."""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from typing import Any

from .context import Context, packed_candidate, use_attention
from .runner import Skip
from .step import optimizer_step, step_batches, step_model, step_optimizer

MEASURED_STEPS = 3
LIBRARIES = ("/finetune/", "/transformers/", "/peft/", "/accelerate/")


def call_site(stack: list[traceback.FrameSummary]) -> str:
    """'file:line (function)' of the innermost frame outside torch and this check, then, when
    that is not finetune's, the nearest of finetune's or a library's frames."""
    frames = [f for f in stack if "/warnings.py" not in f.filename
              and "/gpu_check/syncs.py" not in f.filename]
    outside_torch = [f for f in frames if "/torch/" not in f.filename]
    inner = (outside_torch or frames)[-1]
    site = f"{_short(inner.filename)}:{inner.lineno} ({inner.name})"
    owned = [f for f in outside_torch if any(lib in f.filename for lib in LIBRARIES)]
    if owned and owned[-1] is not inner:
        site += f" <- {_short(owned[-1].filename)}:{owned[-1].lineno} ({owned[-1].name})"
    return site


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/finetune/", "/scripts/"):
        if marker in path:
            head = marker.strip("/") + "/" if marker != "/site-packages/" else ""
            return head + path.split(marker, 1)[1]
    return path


def count_syncs(step: Any) -> Counter[str]:
    """Call sites of the synchronising CUDA calls `step()` makes, with their counts."""
    import torch

    sites: Counter[str] = Counter()

    def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):
            sites[call_site(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def section_syncs(ctx: Context, out: dict[str, Any]) -> None:
    planned = packed_candidate(ctx)
    if planned.packing_isolation is None:
        raise Skip(f"the plan's attention ({planned.name}) does not pack")
    attn = use_attention(ctx, planned)
    model = step_model(ctx, attn, ctx.packed_plan.choice("lora"))
    optimizer = step_optimizer(ctx, model)
    batches = step_batches(ctx, planned.packing_isolation, MEASURED_STEPS + 1)
    optimizer_step(model, optimizer, batches[0])  # warm-up: compiles and allocates
    out.update(attention=planned.name, lora=ctx.packed_plan.choice("lora"), steps=MEASURED_STEPS)
    if not ctx.gpu:  # the step itself ran; only the counting needs CUDA
        raise Skip("torch.cuda.set_sync_debug_mode counts CUDA synchronisations; this run has no "
                   "CUDA device (a warm-up optimizer step ran, uncounted)")
    sites = count_syncs(lambda: [optimizer_step(model, optimizer, b) for b in batches[1:]])
    out["syncs_per_step"] = round(sum(sites.values()) / MEASURED_STEPS, 2)
    out["call_sites"] = {site: round(n / MEASURED_STEPS, 2) for site, n in sites.most_common()}
