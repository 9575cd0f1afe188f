"""Several machines, played by two launchers on loopback, and a rank that fails mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._cli import QUICK, REPO, read_step_metrics, run_cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_share_one_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = str(_free_port())
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", "run", "lora_sft", *QUICK,
         f"output_dir={run_dir}", "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
         "--master-addr", "127.0.0.1", "--master-port", port],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one directory for both nodes
    assert (run_dir / "final/adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_step_metrics(run_dir)] == list(range(1, 7))  # rank 0's
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    logs = {p.name: p.read_text() for p in (run_dir / "logs").iterdir()}
    assert sorted(logs) == ["rank_0.log", "rank_1.log"]
    for rank in (0, 1):  # each opens with the rank and where it ran, then its own records
        lines = logs[f"rank_{rank}.log"].splitlines()
        assert f"rank {rank} of 2 on {socket.gethostname()}" in lines[0]
        assert any(" I finetune." in line for line in lines[1:]), lines


# Installed as sitecustomize.py for the test's processes: on rank 1 only, the third gradient
# window raises, as a bug or a lost device would, after writing when it did.
FAIL_ON_RANK_1 = """
import os, time
if os.environ.get("RANK") == "1":
    from finetune.train import trainer
    _accumulate = trainer.accumulate_gradients
    calls = []
    def _fail_on_the_third_window(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            with open(os.environ["FT_FAILED_AT"], "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("injected failure on rank 1 in its third step")
        return _accumulate(*args, **kwargs)
    trainer.accumulate_gradients = _fail_on_the_third_window
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_and_its_error_is_shown(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    failed_at = tmp_path / "failed_at"
    # The repository after the site folder: sitecustomize imports the package before `python -m`
    # puts the working directory on the path.
    path = [str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(path), "FT_FAILED_AT": str(failed_at)}
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", *QUICK, f"output_dir={run_dir}",
                     "--nproc", "2", env=env, timeout=600)
    ended_at = time.time()
    assert result.returncode not in (0, 75), result.stderr[-3000:]
    # A bound on hanging, not a speed measure: the other rank is stopped, nothing waits for
    # the collective timeout (distributed.timeout_s).
    assert ended_at - float(failed_at.read_text()) < 60
    summary = result.stderr[result.stderr.index("Root Cause"):]  # torchrun's failure summary
    assert "rank      : 1" in summary
    assert "RuntimeError: injected failure on rank 1 in its third step" in summary
    rank_1 = (run_dir / "logs/rank_1.log").read_text()
    assert "RuntimeError: injected failure on rank 1 in its third step" in rank_1
    assert not (run_dir / "final").exists()
