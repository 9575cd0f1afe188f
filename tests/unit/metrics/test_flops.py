"""Model FLOPs for MFU: a hand count for a small Llama, and torch's FlopCounterMode (which counts
every matmul autograd really runs) as an independent oracle for full and LoRA training."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.flops import (
    FlopCounter,
    TrainingMode,
    attention_flops,
    document_lengths,
    flops_per_token,
    step_flops,
)

# hidden 64, MLP 128, 2 layers, 4 query heads and 2 KV heads of 16, vocab 100.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def config():
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL)


def _model(config, *, input_grads: bool = False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    if input_grads:
        model.enable_input_require_grads()
    return model


def _lora(model, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules=targets))


def _measured(model, batch: int, length: int) -> int:
    """FLOPs torch counts for one forward and backward of a [batch, length] batch."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, SMALL["vocab_size"], (batch, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


def test_hand_count_of_a_small_llama(config) -> None:
    # Weight matrices per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down
    # 128x64 = 36,864 multiply-adds; 2 layers + LM head 64x100 = 80,128 per token.
    forward = 2 * (2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 100)
    assert forward == 160_256
    assert flops_per_token(config, TrainingMode(full=True)) == 3 * forward
    # LoRA r=8 on q (64->64) and v (64->32) of both layers: each adds 6 r (in + out).
    adapters = ((64, 64, 8), (64, 32, 8)) * 2
    lora = 2 * forward + 2 * (6 * 8 * (64 + 64) + 6 * 8 * (64 + 32))
    assert lora == 342_016
    assert flops_per_token(config, TrainingMode(full=False, adapters=adapters)) == lora
    # Attention per causal pair: QK^T and AV, 2 x 2 x 4 heads x 16 per layer, x 3 for training.
    per_pair = 3 * 2 * 2 * 4 * 16 * 2
    assert attention_flops(config, [3, 5]) == per_pair * (6 + 15)
    assert step_flops(config, TrainingMode(full=True), [3, 5]) == 3 * forward * 8 + per_pair * 21


def test_packed_documents_count_their_own_lengths(config) -> None:
    """Two documents of 4 packed in a row attend within themselves: 20 pairs, not 36."""
    one, two = attention_flops(config, [8]), attention_flops(config, [4, 4])
    assert one / two == pytest.approx(36 / 20)


def test_full_training_matches_torch_flop_counter(config) -> None:
    model = _model(config)
    # One token per document: causal and full attention are the same single pair.
    assert _measured(model, 3, 1) == step_flops(config, TrainingMode(full=True), [1, 1, 1])
    # Longer documents: eager attention computes the full square, we count the causal triangle.
    masked_pairs = 3 * (36 - 21)
    per_pair = attention_flops(config, [1])
    assert _measured(model, 3, 6) == (step_flops(config, TrainingMode(full=True), [6, 6, 6])
                                      + masked_pairs * per_pair)


def test_lora_training_matches_torch_flop_counter(config) -> None:
    """Frozen weights get input gradients only; the adapters cost 6 r (in + out) per token.
    With input gradients on (as activation checkpointing sets them) autograd runs exactly the
    counted matmuls."""
    model = _lora(_model(config, input_grads=True), ["q_proj", "v_proj"])
    mode = TrainingMode.of(model)
    assert sorted(mode.adapters) == sorted([(64, 64, 8), (64, 32, 8)] * 2) and not mode.full
    assert _measured(model, 3, 1) == step_flops(config, mode, [1, 1, 1])
    # Without them, autograd skips layer 0's input gradients of q, k, v, of the q/v adapters'
    # A matrices, and of K in the attention core: the count is that much above.
    plain = _lora(_model(config), ["q_proj", "v_proj"])
    skipped = 2 * 64 * (64 + 32 + 32) + 2 * (2 * 8 * 64) + 2 * 4 * 16
    assert _measured(plain, 3, 1) == step_flops(config, mode, [1, 1, 1]) - 3 * skipped


def test_training_mode_of_a_plain_model_is_full(config) -> None:
    assert TrainingMode.of(_model(config)) == TrainingMode(full=True)


def test_unknown_architectures_are_not_guessed(config) -> None:
    from types import SimpleNamespace

    from transformers import MixtralConfig

    moe = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    assert flops_per_token(moe, TrainingMode(full=True)) is None
    assert step_flops(moe, TrainingMode(full=True), [4]) is None
    no_mlp_size = SimpleNamespace(**{k: v for k, v in SMALL.items() if k != "intermediate_size"})
    assert flops_per_token(no_mlp_size, TrainingMode(full=True)) is None
    assert flops_per_token(SimpleNamespace(**SMALL), TrainingMode(full=True)) is not None
    assert not FlopCounter(moe, TrainingMode(full=True)).known


def test_ungated_mlps_have_two_matrices() -> None:
    from transformers import GPTNeoXConfig

    neox = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=100)
    forward = 2 * (2 * (4 * 64 * 64 + 2 * 64 * 128) + 64 * 100)
    assert flops_per_token(neox, TrainingMode(full=True)) == 3 * forward


# ---------------------------------------------------------------- document lengths


def test_lengths_of_padded_rows_leave_padding_out() -> None:
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert document_lengths(batch) == [3, 5]


def test_lengths_of_packed_rows_follow_position_restarts() -> None:
    varlen = {"input_ids": torch.zeros(1, 9, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])}
    assert document_lengths(varlen) == [3, 2, 4]
    block = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]),
             "attention_mask": torch.zeros(2, 1, 4, 4)}  # 4D block mask: not padding
    assert document_lengths(block) == [2, 2, 3, 1]


def test_counting_a_collated_batch_equals_the_formula(config) -> None:
    from finetune.data.collate import Collator

    ones = lambda n: (torch.arange(n).numpy(), torch.ones(n, dtype=torch.bool).numpy())  # noqa: E731
    rows = [[ones(3), ones(5)], [ones(6)]]
    batch = Collator(pad_id=0, isolation="varlen")(rows)
    counter = FlopCounter(config, TrainingMode(full=True))
    assert counter.step([batch]) == step_flops(config, TrainingMode(full=True), [3, 5, 6])


def test_lengths_refuse_device_tensors() -> None:
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long, device="meta")}
    with pytest.raises(ValueError, match="before it moves to the device"):
        document_lengths(batch)
