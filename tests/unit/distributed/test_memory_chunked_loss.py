"""The memory estimate's loss head under the chunked loss: exact bytes, and what it saves."""

from __future__ import annotations

from dataclasses import replace

from transformers import LlamaConfig

from finetune.distributed.memory import Workload, model_shape
from finetune.kernels.chunked_loss import CHUNK_BYTES, chunk_rows

# A Llama-3-like head on a small body: vocab 128,256, hidden 256.
VOCAB, HIDDEN, TOKENS = 128_256, 256, 2048


def _workload(**fields) -> Workload:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Workload(shape=model_shape(config), micro_batch_size=1, seq_len=TOKENS,
                    base_dtype="fp32", trainable_dtype="fp32", compute_dtype="fp32", **fields)


def test_chunked_loss_head_bytes_are_exact() -> None:
    rows = CHUNK_BYTES // (4 * VOCAB)
    assert chunk_rows(VOCAB) == rows == 130
    lora = _workload(chunked_loss=True).activation_parts()
    # The gradient of the head's input (fp32 hidden states), and one chunk's logits at 8 bytes.
    assert lora["logits_kept"] == TOKENS * 4 * HIDDEN == 2_097_152
    assert lora["logits_transient"] == rows * VOCAB * 8 == 133_386_240
    full = _workload(chunked_loss=True, peft_method="none").activation_parts()
    assert full["logits_kept"] == TOKENS * 4 * HIDDEN + 4 * VOCAB * HIDDEN  # + the head's grad
    assert full["logits_transient"] == lora["logits_transient"]


def test_chunked_loss_head_is_a_tenth_of_the_unchunked_one_at_a_large_vocabulary() -> None:
    plain = _workload().activation_parts()
    chunked = _workload(chunked_loss=True).activation_parts()
    head = plain["logits_kept"] + plain["logits_transient"]
    assert head == TOKENS * VOCAB * (4 + 4 + 4)
    assert chunked["logits_kept"] + chunked["logits_transient"] < head / 10
    others = ("layers", "recomputed", "outside")
    assert all(plain[k] == chunked[k] for k in others)


def test_short_batches_hold_no_more_than_their_own_logits() -> None:
    short = replace(_workload(chunked_loss=True), seq_len=16).activation_parts()
    assert short["logits_transient"] == 16 * VOCAB * 8
