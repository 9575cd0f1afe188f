"""The start banner: the kernel plan as table rows, and the key settings a user checks."""

from __future__ import annotations

import io

from rich.console import Console

from finetune.config.compose import compose_run_config
from finetune.metrics.banner import key_settings, plan_rows, print_plan

PLAN_TEXT = """hardware: H100 (nvidia sm_90, 1 x 80 GiB, 989 bf16 TFLOP/s peak, cuda 12.8, torch 2.8)
attention: flash_attention_2 (flash-attn 2.8 (varlen); self-check passed; packing on)
precision: bf16 (native bf16; base bf16, trainable fp32, autocast on)
env: NCCL_P2P_LEVEL=NVL (NVLink between the GPUs)"""


def test_plan_lines_become_rows() -> None:
    assert plan_rows(PLAN_TEXT) == [
        ("hardware", "H100 (nvidia sm_90, 1 x 80 GiB, 989 bf16 TFLOP/s peak, cuda 12.8, "
                     "torch 2.8)", ""),
        ("attention", "flash_attention_2", "flash-attn 2.8 (varlen); self-check passed; "
                                           "packing on"),
        ("precision", "bf16", "native bf16; base bf16, trainable fp32, autocast on"),
        ("env", "NCCL_P2P_LEVEL=NVL (NVLink between the GPUs)", ""),
    ]


def test_the_plan_as_a_table_keeps_every_reason() -> None:
    stream = io.StringIO()
    console = Console(file=stream, width=200, color_system=None)
    print_plan(console, rich=True, title="finetune lora_sft: output_dir=runs/x",
               plan_text=PLAN_TEXT)
    out = stream.getvalue()
    assert out.startswith("finetune lora_sft: output_dir=runs/x\n")
    assert "│ attention │ flash_attention_2 │ flash-attn 2.8 (varlen); self-check passed" in out
    assert "NCCL_P2P_LEVEL=NVL (NVLink between the GPUs)" in out


def test_key_settings_name_what_trains_and_how() -> None:
    cfg = compose_run_config("lora_sft", ["peft=none", "trainer.save_every_minutes=30",
                                          "trainer.eval_every_n_steps=0"])
    rows = dict(key_settings(cfg, parameters=(7_400_000, 7_400_000), world_size=2,
                             start_step=10, total_steps=80,
                             data_stats={"format": "chat", "rows": None, "max_seq_len": 512,
                                         "max_seq_len_from": "data.max_seq_len",
                                         "isolation": "varlen"},
                             trackers=["wandb", "tensorboard"], display="live"))
    assert rows["model"] == ("tiny, 7.4M parameters, 7.4M trainable (full fine-tune); "
                             "2 process(es)")
    assert rows["data"].startswith("chat, streamed") and rows["data"].endswith("packing on (varlen isolation)")
    assert rows["steps"].startswith("10 -> 80; micro_batch")
    assert "every 30 min" in rows["checkpoints"] and "eval at the end" in rows["checkpoints"]
    assert rows["logging"] == "metrics.jsonl, console (live), wandb, tensorboard"
