"""leak: per attention path that packs, each document's logits and gradients inside a packed
batch (the project's own collator) equal the document run alone."""

from __future__ import annotations

from typing import Any

from .context import (
    Context,
    candidates,
    llama,
    plan_candidate,
    to_device,
    unsupported,
    use_attention,
)


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
    use_attention(ctx, plan_candidate(ctx))
    # The leaking run: one causal row over all documents (positions still restart per
    # document), through an explicit 4D mask, which transformers passes on unchanged.
    leaking = Collator(pad_id=0, isolation="varlen", mask_dtype=ctx.dtype,
                       device=ctx.device)([docs])
    n = leaking["input_ids"].shape[1]
    causal = torch.full((n, n), torch.finfo(ctx.dtype).min, device=ctx.device).triu(1)
    leaking["attention_mask"] = causal[None, None].to(ctx.dtype)
    leak_logits, leak_grads = _forward_backward(reference, to_device(leaking, ctx.device), spans)
    out["unsupported"] = unsupported(ctx, packing=True)
    for name, candidate in candidates(ctx, packing=True).items():
        if candidate.packing_isolation is None:
            continue
        model = llama(ctx, shape, use_attention(ctx, candidate), init_range=0.1, state=state)
        # The mask (4D or flex) is built on the device it runs on, as in training.
        collate = Collator(pad_id=0, isolation=candidate.packing_isolation, mask_dtype=ctx.dtype,
                           device=ctx.device)
        packed_logits, packed_grads = _forward_backward(model, to_device(collate([docs]),
                                                                         ctx.device),
                                                        spans)
        alone_grads: dict[str, torch.Tensor] = {}
        logit_err = leak_err = 0.0
        for doc, (s, e) in zip(docs, spans, strict=True):
            single = Collator(pad_id=0, isolation=None, mask_dtype=ctx.dtype,
                              device=ctx.device)([[doc]])
            logits, grads = _forward_backward(model, to_device(single, ctx.device), [(0, e - s)])
            scale = logits.abs().max().item()
            error = (packed_logits[0, s:e] - logits[0]).abs().max().item() / scale
            logit_err = max(logit_err, error)
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
    use_attention(ctx, plan_candidate(ctx))
