"""DeepSpeed ZeRO (distributed=deepspeed_zero2|deepspeed_zero3) on 2 CPU processes with gloo:
the losses of one process with the same global batch, checkpoints of whole tensors in
safetensors (nothing pickled), an exact resume after kill -9, resume on another world size and
stage, and a final/ adapter of fp32 master weights. Skipped without DeepSpeed
(pip install 'finetune[deepspeed]')."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._cli import REPO, read_step_metrics, run_cli

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow

CRASH = Path(__file__).with_name("_crash_run.py")
STEPS = 4
# fp32: DeepSpeed's bf16 mode keeps bf16 weights for the forward, one process autocasts fp32
# weights; the equality below is about sharding and accumulation, not that rounding.
FP32 = "kernels.precision=fp32"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("deepspeed-data")
    rows = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} {i}"}
            for i in range(24)]
    val = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} {i}"}
           for i in (97, 98, 99)]  # 3 rows: one rank's last eval batch has nothing to score
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    return folder


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", "lora_sft", f"data.path={data / 'train.jsonl'}", "data.format=alpaca",
            f"data.val_path={data / 'val.jsonl'}", "data.max_seq_len=48",
            f"trainer.max_steps={STEPS}", "trainer.grad_accum_steps=2",
            "trainer.save_every_n_steps=2", "trainer.eval_every_n_steps=2", "optim.lr=1e-3",
            "optim.warmup_steps=2", FP32, "logger.display=plain", f"output_dir={run_dir}",
            *extra]


def _sharded(data: Path, run_dir: Path, stage: int) -> list[str]:
    return _args(data, run_dir, f"distributed=deepspeed_zero{stage}",
                 "trainer.micro_batch_size=1", "distributed.timeout_s=120")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_step_metrics(run_dir)]


def _grad_norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_step_metrics(run_dir)]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final/adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = run_cli(*_args(data_file, run_dir, "trainer.micro_batch_size=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def zero2(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    result = run_cli(*_sharded(data_file, run_dir, 2), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _matches_one_process(sharded: Path, one: Path) -> None:
    a, b = _losses(sharded), _losses(one)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    # The same gradients: DeepSpeed neither averages them over the accumulation steps again
    # nor over the processes (the loss is already normalised by the window's tokens).
    assert _grad_norms(sharded) == pytest.approx(_grad_norms(one), rel=1e-4)
    # final/ holds the fp32 master weights, gathered: those one process trains (to a tenth of
    # one Adam update: gradients summed in another order differ in their last bits).
    ours, theirs = _adapter(sharded), _adapter(one)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert ours[key].dtype == torch.float32
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-4)


def test_zero2_matches_one_process_and_checkpoints_per_rank(zero2: Path,
                                                             one_process: Path) -> None:
    _matches_one_process(zero2, one_process)
    step = zero2 / "checkpoints/step_0000002"
    # Whole tensors and JSON: no DeepSpeed file that would be unpickled on resume.
    assert sorted(p.name for p in (step / "deepspeed").iterdir()) == ["master.safetensors",
                                                                       "state.json"]
    assert not (step / "trainable.safetensors").exists()
    evals = [r for r in map(json.loads, (zero2 / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]


def test_zero3_matches_one_process(data_file: Path, one_process: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "zero3"
    result = run_cli(*_sharded(data_file, run_dir, 3), "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    _matches_one_process(run_dir, one_process)


def test_zero2_kill9_resume_is_exact_and_on_one_process(data_file: Path, zero2: Path,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "crashed"
    args = _sharded(data_file, run_dir, 2)
    env = {**os.environ, "FT_CRASH_AT_STEP": "2", "FT_CRASH_MODE": "after"}
    crashed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", str(CRASH), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert crashed.returncode != 0
    assert not (run_dir / "final").exists()
    copy = tmp_path / "crashed-copy"
    shutil.copytree(run_dir, copy)

    result = run_cli(*args, "resume=auto", "--nproc", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert _losses(run_dir) == _losses(zero2)
    ours, straight = _adapter(run_dir), _adapter(zero2)
    assert ours.keys() == straight.keys()
    for key in ours:
        assert torch.equal(ours[key], straight[key]), key

    # The same checkpoint on one process under ZeRO-3 (global batch 4 again): the whole
    # tensors are partitioned for this world size and the run continues where it stopped.
    one = [f"output_dir={copy}" if a == f"output_dir={run_dir}" else a for a in args
           if a not in ("distributed=deepspeed_zero2", "trainer.micro_batch_size=1")]
    result = run_cli(*one, "distributed=deepspeed_zero3", "trainer.micro_batch_size=2",
                     "resume=auto", "--nproc", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s for s, _ in _losses(copy)] == list(range(1, STEPS + 1))
    for (_, x), (_, y) in zip(_losses(copy)[2:], _losses(zero2)[2:], strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    state = json.loads((copy / f"checkpoints/step_{STEPS:07d}/trainer_state.json").read_text())
    assert state["world_size"] == 1
    for key, value in _adapter(copy).items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=1e-4)
