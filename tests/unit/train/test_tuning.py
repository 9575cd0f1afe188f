"""The run's tuning shapes come from its model and its data: the document lengths and the row
length data.max_seq_len=auto settles on are read from the data, through the tokenized cache."""

from __future__ import annotations

from finetune.config.compose import compose_run_config
from finetune.config.kernels import KernelsConfig
from finetune.hardware import profile_by_name
from finetune.kernels import plan
from finetune.models import load_model_config
from finetune.train.tuning import TUNE_SEQ_LEN, data_lengths, run_shapes


def test_shapes_follow_the_bundled_data(tiny_model_dir) -> None:
    cfg = compose_run_config("lora_sft", [])
    hf_config = load_model_config(cfg.model)
    found = data_lengths(cfg, hf_config)
    assert found is not None
    lengths, row = found
    assert row == 64  # data.max_seq_len=auto on the bundled rows (99% fit in 31 tokens)
    assert len(set(lengths)) > 3 and max(lengths) <= row and min(lengths) >= 1
    kernel_plan = plan(profile_by_name("cpu"), KernelsConfig(), run_selfcheck=False)
    shapes = run_shapes(cfg, hf_config, kernel_plan, "cpu")
    assert shapes.seq_len <= row < TUNE_SEQ_LEN
    assert {n for r in shapes.rows for n in r} <= set(lengths)
    assert (shapes.num_heads, shapes.num_kv_heads, shapes.head_dim) == (8, 4, 32)
    assert shapes.vocab == hf_config.vocab_size and shapes.lora_rank == cfg.peft.r
    packed = run_shapes(compose_run_config("lora_sft", ["data.packing=true"]), hf_config,
                        kernel_plan, "cpu")
    assert all(sum(r) == packed.seq_len for r in packed.rows)
    assert any(len(r) > 1 for r in packed.rows)
    assumed = run_shapes(cfg, hf_config, kernel_plan, "cpu", mean_document=100)
    assert assumed.seq_len > row  # --doc-length replaces the data's lengths
