"""A run states its memory estimate for the row length its data settled on
(data.max_seq_len=auto) and the tokens its padding-free micro-batches hold, not for the length
assumed before the data was read."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

import finetune.distributed.choose as choose
import finetune.hardware as hardware
from finetune.config.compose import compose_run_config
from finetune.distributed.memory import AUTO_SEQ_LEN, GIB, format_bytes
from finetune.models import load_model_config
from finetune.train.recipe import load_recipe
from finetune.train.run import run_training
from finetune.train.setup import plan_kernels

OVERHEAD = GIB // 4  # a fixed stand-in for the process's memory, so the figures are exact


def test_the_run_estimates_with_the_length_the_data_chose(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # A device of 2 GiB: the tiny model's LoRA run fits it with its 64-token rows, not with
    # 2048-token ones (the estimate that used to say "it will not fit").
    detect = hardware.detect
    monkeypatch.setattr(hardware, "detect", lambda: replace(detect(), memory_gb=2.0))
    monkeypatch.setattr(choose, "runtime_overhead", lambda vendor: (OVERHEAD, "test"))
    cfg = compose_run_config("lora_sft", [
        "trainer.max_steps=1", "trainer.eval_every_n_steps=0", "trainer.eval_max_batches=1",
        "trainer.save_every_n_steps=0",
        "kernels.selfcheck=false", f"output_dir={tmp_path / 'run'}"])
    assert cfg.data.max_seq_len == "auto"
    with caplog.at_level(logging.WARNING):
        assert run_training(cfg, load_recipe("lora_sft")) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    length, mean = data["max_seq_len"], data["tokens"] / data["rows"]
    assert length < AUTO_SEQ_LEN and data["padding_free"]

    workload = choose.workload_from_run(cfg, load_model_config(cfg.model), plan_kernels(cfg))
    assumed = workload.estimate("single")
    at_length = replace(workload, seq_len=length, mean_row_tokens=mean).estimate("single")
    assert assumed.total > 0.9 * 2 * GIB > at_length.total
    headline = next(line for line in out.splitlines() if line.startswith("distributed: "))
    assert f"single needs about {format_bytes(at_length.total)} per device, within" in headline
    assert headline.endswith(f"estimated for micro-batches of 8 rows of up to {length} tokens, "
                             f"{at_length.tokens} tokens on average (padding-free)")
    assert at_length.tokens == math.ceil(8 * mean)
    assert "will not fit" not in caplog.text and "run out of memory" not in caplog.text
