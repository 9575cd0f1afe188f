"""Nodes that never meet, and a rendezvous port that is taken: each ends with exit 2 and one
paragraph naming the address, not a hang or a traceback. Only addresses of this machine."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._cli import QUICK, REPO, run_cli


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_nodes_that_do_not_meet_give_up_after_distributed_timeout_s(tmp_path: Path) -> None:
    # Three ports: node 0 listens on every address, 127.0.0.2 included.
    unanswered, static_port, c10d_port = _free_port(), _free_port(), _free_port()
    cases = {  # the flags of the one node that is started, and what its error must say
        "node1_unanswered": (
            ["--node-rank", "1", "--master-addr", "127.0.0.2", "--master-port",
             str(unanswered)],
            [f"node 1 of 2 found no node 0 answering at 127.0.0.2:{unanswered}",
             "Check that node 0 is started"]),
        "node0_alone": (
            ["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port",
             str(static_port)],
            [f"node 0 waited at 127.0.0.1:{static_port} for 2 nodes", "1 of 2 came"]),
        "c10d_alone": (
            ["--rdzv-endpoint", f"127.0.0.1:{c10d_port}"],
            [f"the c10d rendezvous at 127.0.0.1:{c10d_port} did not gather all 2 nodes",
             "1 of 2 came"]),
    }
    started = {name: subprocess.Popen(  # at once: each waits out its timeout
        [sys.executable, "-m", "finetune.cli", "run", "lora_sft", *QUICK,
         f"output_dir={tmp_path / name}", "distributed.timeout_s=3",
         "--nnodes", "2", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name, (flags, _) in cases.items()}
    try:
        errors = {name: proc.communicate(timeout=240)[1]  # a hang fails here, not in CI's limit
                  for name, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:  # passed on to torchrun, which stops waiting
                proc.terminate()
                proc.wait(60)
    for name, proc in started.items():
        err = errors[name]
        assert proc.returncode == 2, (name, err[-3000:])
        assert "Traceback" not in err and "frame #" not in err, (name, err[-3000:])
        error = err[err.index("error: "):].strip()
        assert "\n" not in error, error  # one paragraph
        assert "within distributed.timeout_s=3 s" in error, error
        for expected in cases[name][1]:
            assert expected in error, (name, error)
        assert not (tmp_path / name).exists()  # left as found: absent


@pytest.mark.slow
def test_a_master_port_in_use_exits_2_naming_the_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "lora_sft", *QUICK, f"output_dir={tmp_path / 'run'}",
                         "--nproc", "2", "--master-port", str(port), timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error: "):].strip()
    assert "\n" not in error, error
    assert f"--master-port {port}: port {port} is already in use on this machine" in error
    assert "e.g. --master-port " in error and "leave --master-port out" in error
