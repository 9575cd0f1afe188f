"""A rendezvous that cannot complete: torchrun's timeout flags, the failures torch raises read
into what happened, and the one-paragraph error the launcher raises for each."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

from finetune.errors import ConfigError, RendezvousError
from finetune.train.launch import Nodes, torchrun_command
from finetune.train.rendezvous import (
    RendezvousFailure,
    _timeout_from,
    classify,
    launcher_env,
    read_report,
    rendezvous_error,
)

STATIC_1 = Nodes(count=2, rank=1, master_addr="127.0.0.2", master_port=29533)
STATIC_0 = Nodes(count=3, rank=0, master_addr="10.0.0.1", master_port=29533)
C10D = Nodes(count=2, rdzv_endpoint="127.0.0.1:29400")


def test_the_rendezvous_waits_distributed_timeout_s() -> None:
    static = STATIC_1.torchrun_flags(Path("runs/a"), timeout_s=7)
    assert "--rdzv_conf=timeout=7" in static
    c10d = C10D.torchrun_flags(Path("runs/a"), timeout_s=7)
    assert "--rdzv_conf=join_timeout=7,read_timeout=7" in c10d
    long = C10D.torchrun_flags(Path("runs/a"), timeout_s=900)  # torch's read timeout kept
    assert "--rdzv_conf=join_timeout=900,read_timeout=60" in long
    command = torchrun_command(2, "lora_sft", [], Path("runs/a"), STATIC_1, 7)
    assert command[1:3] == ["-m", "finetune.train.rendezvous"]
    assert _timeout_from(command) == 7 and _timeout_from(
        C10D.torchrun_flags(Path("runs/a"), timeout_s=9)) == 9
    assert _timeout_from(torchrun_command(2, "lora_sft", [], Path("runs/a"))) is None


@pytest.mark.parametrize(("exc", "expected"), [
    (dist.DistStoreError("Timed out after 6 seconds waiting for clients. 1/3 clients joined."),
     RendezvousFailure("timeout", "", 1, 3)),
    (dist.DistNetworkError("The client socket has timed out after 5000ms while trying to "
                           "connect to (127.0.0.2, 29533)."),
     RendezvousFailure("unreachable", "")),
    (dist.DistNetworkError("The server socket has failed to listen on any local network "
                           "address. port: 29533, useIpv6: false, code: -98, name: EADDRINUSE, "
                           "message: address already in use"),
     RendezvousFailure("port_in_use", "")),
    (RendezvousTimeoutError(), RendezvousFailure("timeout", "", None)),
])
def test_torch_failures_are_read_into_what_happened(exc: Exception,
                                                    expected: RendezvousFailure) -> None:
    failure = classify(exc)
    assert (failure.kind, failure.joined, failure.expected) == (
        expected.kind, expected.joined, expected.expected)
    assert type(exc).__name__ in failure.detail


def test_a_c10d_timeout_counts_the_nodes_that_joined_this_one_included() -> None:
    class State:
        participants = {"node-b": 1}

    class Holder:
        state = State()

    class Handler:
        _state_holder = Holder()
        _this_node = "node-a"  # torch removes it from the participants when it times out

    assert classify(RendezvousTimeoutError(), Handler()).joined == 2


def test_node_0_waiting_alone_names_its_address_and_who_came() -> None:
    error = rendezvous_error(RendezvousFailure("timeout", "x", 1, 3), STATIC_0, 30)
    assert isinstance(error, RendezvousError) and error.exit_code == 2
    message = str(error)
    assert "node 0 waited at 10.0.0.1:29533 for 3 nodes" in message
    assert "within distributed.timeout_s=30 s: 1 of 3 came (only this one)" in message
    assert "--node-rank (1 to 2)" in message and "firewall blocks port 29533" in message
    assert "\n" not in message


def test_another_node_names_node_0s_address_and_the_flags_to_compare() -> None:
    message = str(rendezvous_error(RendezvousFailure("unreachable", "x"), STATIC_1, 5))
    assert "node 1 of 2 found no node 0 answering at 127.0.0.2:29533" in message
    assert "is started (the same command with --node-rank 0)" in message
    assert "--master-addr 127.0.0.2 --master-port 29533" in message
    default_port = Nodes(count=2, rank=1, master_addr="n0")
    assert "n0:29500" in str(rendezvous_error(RendezvousFailure("timeout", "x"), default_port, 5))


def test_a_c10d_rendezvous_names_its_endpoint_and_count() -> None:
    message = str(rendezvous_error(RendezvousFailure("timeout", "x", 1), C10D, 5))
    assert "the c10d rendezvous at 127.0.0.1:29400 did not gather all 2 nodes" in message
    assert "1 of 2 came" in message and "--rdzv-endpoint 127.0.0.1:29400" in message


def test_a_port_in_use_is_a_usage_error_with_a_free_port_to_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        one_machine = Nodes(master_port=port)
        error = rendezvous_error(RendezvousFailure("port_in_use", "x"), one_machine, 600)
    assert isinstance(error, ConfigError) and error.exit_code == 2
    message = str(error)
    assert f"--master-port {port}: port {port} is already in use on this machine" in message
    assert "e.g. --master-port " in message
    assert "or leave --master-port out and a free port is picked" in message


def test_the_report_travels_through_a_file_and_the_ranks_keep_the_users_log_level(
        tmp_path: Path) -> None:
    assert read_report(tmp_path / "absent.json") is None
    report = tmp_path / "report.json"
    env = launcher_env(report, {"PATH": "/bin"})
    assert env["TORCH_CPP_LOG_LEVEL"] == "FATAL" and env["FINETUNE_RENDEZVOUS_REPORT"] == str(
        report)
    users = launcher_env(report, {"TORCH_CPP_LOG_LEVEL": "INFO"})
    assert users["TORCH_CPP_LOG_LEVEL"] == "INFO"
    assert "FINETUNE_RESTORE_CPP_LOG_LEVEL" not in users
