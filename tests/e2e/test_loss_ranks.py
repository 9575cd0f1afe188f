"""Across ranks the loss is divided by the trained tokens of the whole window on every rank,
not of this rank: with ranks holding different numbers of trained tokens, two DDP processes
(gloo) give the gradients of one process over the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e._window_gradients import window_gradients

WORKER = Path(__file__).with_name("_window_gradients.py")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _data(folder: Path) -> Path:
    """Answers of 1 to 16 words: any two rows hold different numbers of trained tokens."""
    rows = [{"instruction": f"Say ok {n} times.", "input": "", "output": " ".join(["ok"] * n)}
            for n in range(1, 17)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_uneven_tokens_give_one_processs_gradients(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    common = [f"data.path={_data(tmp_path)}", "data.format=alpaca", "data.val_split=0",
              "data.max_seq_len=96", "trainer.micro_batch_size=1", "trainer.prefetch=0",
              "trainer.eval_every_n_steps=0", "kernels.precision=fp32", "kernels.selfcheck=false"]
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(REPO)}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(out), str(tmp_path / "ddp"),
                               "ddp", *common, "trainer.grad_accum_steps=1"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    # One process, the same 2 rows as 2 micro-batches of one step.
    single = window_gradients(tmp_path / "single", "single",
                              [*common, "trainer.grad_accum_steps=2"])
    ddp = torch.load(out)
    assert set(ddp) == set(single) and single
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-5, atol=1e-8, msg=name)
