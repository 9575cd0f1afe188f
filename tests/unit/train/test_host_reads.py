"""Sequence boundaries and loss positions are computed on the host, by the collator: no layer
and no loss reads a value back from the device to find them.

On a CPU nothing is a real device sync, so the reads a GPU would wait for are counted instead:
every call that turns a tensor into a host value (`.tolist()`, `.item()`, `nonzero`, `bool()`,
`int()`, `float()`, ...) is recorded with the innermost frame outside torch that made it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from finetune.data.collate import LOSS_POSITIONS, Collator
from finetune.kernels.varlen_sdpa import DOCUMENT_LENGTHS, VARLEN_SDPA
from finetune.train.loss import causal_lm_loss

READS = {"tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu",
         "numpy"}
TORCH_DIR = str(Path(torch.__file__).parent)


class HostReads(TorchFunctionMode):
    """Records (read, "package/module.py:function") for each tensor-to-host read while
    `active`: the site is the innermost frame outside torch (and outside this file)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = True
        self.sites: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.active and name in READS:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if not frame.filename.startswith(TORCH_DIR) and frame.filename != __file__:
                    parts = Path(frame.filename).parts
                    where = "/".join(parts[-2:]) if "finetune" not in parts else "/".join(
                        parts[parts.index("finetune"):])
                    self.sites[(name, f"{where}:{frame.name}")] += 1
                    break
        return func(*args, **(kwargs or {}))

    def in_finetune(self) -> Counter[tuple[str, str]]:
        return Counter({k: n for k, n in self.sites.items() if k[1].startswith("finetune/")})


def _model(tiny_model_dir: Path, attention: str, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.kernels.varlen_sdpa import register_varlen_sdpa

    register_varlen_sdpa()
    config = AutoConfig.from_pretrained(tiny_model_dir, num_hidden_layers=layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, dtype=torch.float32,
                                                attn_implementation=attention)


def _docs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(10, 1000, n), np.arange(n) >= prompt)
            for n, prompt in ((12, 4), (5, 1), (9, 3), (7, 7))]


def test_a_flattened_batch_carries_its_boundaries_as_transformers_flattening_collator_does() -> None:
    docs = _docs()
    batch = Collator(pad_id=0, isolation="varlen")([[d] for d in docs])
    assert batch["cu_seq_lens_q"].tolist() == [0, 12, 17, 26, 33]
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 12
    assert type(batch["max_length_q"]) is int
    assert batch[DOCUMENT_LENGTHS] == (12, 5, 9, 7)
    assert all(type(n) is int for n in batch[DOCUMENT_LENGTHS])
    # The positions whose next token is trained, in any row.
    targets = batch["labels"][0, 1:] != -100
    assert batch[LOSS_POSITIONS].tolist() == torch.nonzero(targets).flatten().tolist()
    padded = Collator(pad_id=0, isolation=None)([[d] for d in docs])
    assert "cu_seq_lens_q" not in padded and DOCUMENT_LENGTHS not in padded
    assert padded[LOSS_POSITIONS].tolist() == torch.nonzero(
        (padded["labels"][:, 1:] != -100).any(dim=0)).flatten().tolist()


def test_the_batch_mover_keeps_the_host_lengths_on_the_host() -> None:
    from finetune.train.feed import to_device

    batch = Collator(pad_id=0, isolation="varlen")([[d] for d in _docs()])
    moved = to_device(batch, torch.device("meta"))
    assert moved["cu_seq_lens_q"].device.type == moved[LOSS_POSITIONS].device.type == "meta"
    assert moved[DOCUMENT_LENGTHS] == (12, 5, 9, 7) and moved["max_length_q"] == 12


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize(("attention", "isolation"), [(VARLEN_SDPA, "varlen"),
                                                      ("sdpa", None), ("sdpa", "block_mask_4d")])
def test_a_micro_batch_reads_nothing_back_in_its_layers_or_its_loss(
        tiny_model_dir: Path, attention: str, isolation: str | None, layers: int) -> None:
    """Forward and backward of `causal_lm_loss`: no read from finetune's code, whatever the
    number of layers. The only read left is transformers' own, once per forward, for a
    flattened row: `find_packed_sequence_indices` asks whether position_ids restart."""
    model = _model(tiny_model_dir, attention, layers)
    docs = _docs()
    rows = [docs[:2], docs[2:]] if isolation == "block_mask_4d" else [[d] for d in docs]
    batch = Collator(pad_id=0, isolation=isolation)(rows)
    num_items = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()))
    reads = HostReads()
    with reads:
        causal_lm_loss(model, batch, num_items).backward()
    assert reads.in_finetune() == Counter()
    if isolation == "varlen":
        assert reads.sites == Counter(
            {("__bool__", "transformers/masking_utils.py:find_packed_sequence_indices"): 1})


def test_the_lengths_reach_every_layer_from_the_collator_and_keep_documents_apart(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer's attention gets the collator's lengths as Python ints and never reads the
    row's position_ids; the documents' logits are each document's alone."""
    import finetune.kernels.varlen_sdpa as varlen

    model = _model(tiny_model_dir, VARLEN_SDPA, 3)
    docs = _docs()
    batch = Collator(pad_id=0, isolation="varlen")([[d] for d in docs])
    seen = []
    attention = varlen.varlen_sdpa_attention

    def recording(*args, **kwargs):
        seen.append(kwargs.get(DOCUMENT_LENGTHS))
        return attention(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, recording)
    try:
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(varlen, "document_lengths",
                          lambda *a: pytest.fail("position_ids read for lengths the batch gave"))
            inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_POSITIONS)}
            packed = model(**inputs).logits
    finally:
        AttentionInterface.register(VARLEN_SDPA, attention)
    assert seen == [(12, 5, 9, 7)] * 3
    start = 0
    for ids, _ in docs:
        with torch.no_grad():
            alone = model(input_ids=torch.as_tensor(ids)[None]).logits
        torch.testing.assert_close(packed[:, start:start + len(ids)], alone, rtol=1e-4,
                                   atol=1e-5)
        start += len(ids)


def test_a_training_step_reads_only_its_loss_and_gradient_norm(
        make_trainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the batches' move to the device to the step's log: finetune reads the window's
    loss (one `.tolist()`, with the recipe's metrics) and the gradient norm (clipping, the
    non-finite check and the log), nothing per layer or per micro-batch. transformers reads
    once per micro-batch forward (see above). The token counts and MFU FLOPs are summed from
    the CPU batches before they move, so they wait for no device."""
    import finetune.train.trainer as trainer_module

    steps, accum = 2, 2
    trainer = make_trainer(tmp_path / "run", f"trainer.max_steps={steps}",
                           f"trainer.grad_accum_steps={accum}", "trainer.prefetch=0")
    assert trainer.data.train.collator.isolation == "varlen"  # padding-free rows on CPU
    reads = HostReads()
    reads.active = False
    move, log, evaluate = trainer_module.to_device, trainer._log_step, trainer.evaluate
    in_eval = False

    def moving(*args, **kwargs):
        reads.active = not in_eval
        return move(*args, **kwargs)

    def logging_step(*args, **kwargs):
        reads.active = False
        return log(*args, **kwargs)

    def evaluating(*args, **kwargs):  # the run's end evaluates: not a training step
        nonlocal in_eval
        in_eval = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            in_eval = False

    monkeypatch.setattr(trainer_module, "to_device", moving)
    monkeypatch.setattr(trainer, "_log_step", logging_step)
    monkeypatch.setattr(trainer, "evaluate", evaluating)
    with reads:
        trainer.fit()
    assert reads.in_finetune() == Counter({
        ("tolist", "finetune/train/trainer.py:_read_window"): steps,
        ("__float__", "finetune/distributed/engine.py:clip_grad_norm"): steps,
    })
    in_transformers = {k: n for k, n in reads.sites.items() if k[1].startswith("transformers/")}
    assert in_transformers == {
        ("__bool__", "transformers/masking_utils.py:find_packed_sequence_indices"): steps * accum}
