"""The estimate names the row length it used: the one assumed before the data is read
(`finetune validate`, `finetune env`), then the data's (`with_data_length`)."""

from __future__ import annotations

from transformers import AutoConfig

from finetune.cli import dispatch
from finetune.config.distributed import DistributedConfig, Strategy
from finetune.distributed.choose import PUBLISHED_CONFIGS, choose_strategy, with_data_length
from finetune.distributed.memory import CPU_OVERHEAD_FROM, Workload, model_shape, runtime_overhead
from finetune.hardware import profile_by_name

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def _lora_8b(seq_len: int) -> Workload:
    model_type, sizes = PUBLISHED_CONFIGS[LLAMA_8B]
    return Workload(shape=model_shape(AutoConfig.for_model(model_type, **sizes)),
                    micro_batch_size=8, seq_len=seq_len)


def test_validate_names_the_length_it_assumed(capsys) -> None:
    assert dispatch(["validate", "lora_sft"]) == 0
    err = capsys.readouterr().err
    assert "# row length: data.max_seq_len=auto, assumed 2048 until the data decides" in err
    assert "estimated for micro-batches of 8 x 2048 tokens" in err
    assert dispatch(["validate", "lora_sft", "data.max_seq_len=256"]) == 0
    err = capsys.readouterr().err
    assert "row length:" not in err and "micro-batches of 8 x 256 tokens" in err


def test_the_data_length_re_makes_the_estimate_and_keeps_the_strategy() -> None:
    h100, auto = profile_by_name("h100"), DistributedConfig()
    before = choose_strategy(auto, _lora_8b(2048), h100, 2)
    assert before.strategy == Strategy.fsdp2  # ddp does not fit 8 rows of 2048 tokens
    after = with_data_length(before, auto, h100, 2, seq_len=64, seq_len_from="auto: test")
    assert after.strategy == Strategy.fsdp2 and after.estimate.seq_len == 64
    assert after.estimate.total < before.estimate.total
    assert after.estimate.total == _lora_8b(64).estimate("fsdp2", 2).total
    assert "with this data's 64-token rows distributed=auto chooses ddp" in after.reason
    assert "set distributed=ddp" in after.reason
    assert after.headline().endswith("estimated for micro-batches of 8 x 64 tokens")
    same = with_data_length(before, auto, h100, 2, seq_len=1024, seq_len_from="auto: test")
    assert same.strategy == Strategy.fsdp2 and "chosen for rows" not in same.reason


def test_on_the_cpu_the_overhead_is_this_process() -> None:
    import psutil

    overhead, what = runtime_overhead("cpu")
    assert what == CPU_OVERHEAD_FROM
    assert 0.5 < overhead / psutil.Process().memory_info().rss < 2
    assert runtime_overhead("nvidia") == (2**30, "")


def test_padding_free_rows_count_the_tokens_they_hold() -> None:
    padded = _lora_8b(64)
    padding_free = Workload(shape=padded.shape, micro_batch_size=8, seq_len=64,
                            mean_row_tokens=24.4)
    assert (padded.tokens, padding_free.tokens) == (512, 196)
    parts, free_parts = padded.activation_parts(), padding_free.activation_parts()
    assert free_parts["layers"] * 512 == parts["layers"] * 196
    estimate = padding_free.estimate("single")
    assert estimate.micro_batch() == ("8 rows of up to 64 tokens, 196 tokens on average "
                                      "(padding-free)")
    assert "(8 rows of up to 64 tokens, 196 tokens" in estimate.describe()
    assert Workload(shape=padded.shape, micro_batch_size=8, seq_len=64,
                    mean_row_tokens=80.0).tokens == 512  # never above rows x seq_len
