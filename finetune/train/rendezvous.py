"""How the machines of a run meet (torchrun's rendezvous), and a meeting that gives up.

`Nodes` describes the rendezvous and gives torchrun its flags. `launch_processes` runs
`python -m finetune.train.rendezvous TORCHRUN_ARGS...`, which is torch.distributed.run itself
except for one thing: when the rendezvous fails (not every node came within the timeout, node
0's port is taken, the address never answered), what happened is written as JSON to the file
named by $FINETUNE_RENDEZVOUS_REPORT and the process exits with REPORT_EXIT_CODE, without
torchrun's traceback. The launcher then raises `rendezvous_error`,
which names the address, the nodes that came and what to check. Everything after the
rendezvous (the ranks' output, torchrun's summary of a failed rank) is torchrun's own.

The rendezvous waits `distributed.timeout_s` (torchrun's own default is 600 s whatever that
setting says): `rendezvous_conf` gives torchrun the flag that says so, and a watchdog ends a
wait that torch lets run longer (a node connecting to node 0 tries twice). torch's C++ log is
quiet in this launcher process alone, where connection retries print C++ stack traces; the
ranks log as the user's TORCH_CPP_LOG_LEVEL says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ConfigError, RendezvousError

REPORT_ENV = "FINETUNE_RENDEZVOUS_REPORT"
RESTORE_LOG_LEVEL_ENV = "FINETUNE_RESTORE_CPP_LOG_LEVEL"
GRACE_S = 3  # after distributed.timeout_s, before the launcher gives up on torch's own timeout
REPORT_EXIT_CODE = 2
DEFAULT_MASTER_PORT = 29500  # torchrun's --master-port default
# torchrun's read timeout for the c10d store (also how long a node tries to connect to it)
C10D_READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class Nodes:
    """How the machines of a multi-node run find each other (torchrun's rendezvous).

    Static rendezvous: every node is given `rank` (0 .. count-1) and node 0's `master_addr`
    and `master_port`. c10d rendezvous: every node gets the same `rdzv_endpoint` (HOST:PORT of
    any one of them) and `rdzv_id`, and ranks are handed out as the nodes join.
    """

    count: int = 1
    rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def torchrun_flags(self, output_dir: Path, timeout_s: int | None = None) -> list[str]:
        """torchrun's flags for this rendezvous, which gives up after `timeout_s` (None:
        torchrun's default, 600 s). The default c10d rendezvous id is derived from
        output_dir, which every node shares, so two runs on one endpoint never mix."""
        flags = [f"--nnodes={self.count}"]
        if timeout_s is not None:
            flags.append(f"--rdzv_conf={rendezvous_conf(self, timeout_s)}")
        if self.rdzv_endpoint is not None:
            run_id = self.rdzv_id or "finetune-" + hashlib.sha1(
                str(output_dir).encode()).hexdigest()[:12]
            return [*flags, "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}",
                    f"--rdzv_id={run_id}"]
        flags.append(f"--node_rank={self.rank or 0}")
        flags.append(f"--master_addr={self.master_addr or '127.0.0.1'}")
        if self.master_port is not None:
            flags.append(f"--master_port={self.master_port}")
        return flags


@dataclass(frozen=True)
class RendezvousFailure:
    """What went wrong when the nodes tried to meet.

    `kind`: "port_in_use" (this machine could not listen on the rendezvous port), "unreachable"
    (nothing answered at the address), "timeout" (some nodes came, not all), or "failed".
    `joined`/`expected`: how many nodes had come, of how many, where torch says so.
    """

    kind: str
    detail: str
    joined: int | None = None
    expected: int | None = None


class _NodesDidNotMeet(Exception):
    def __init__(self, failure: RendezvousFailure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


def rendezvous_conf(nodes: Nodes, timeout_s: int) -> str:
    """torchrun's --rdzv_conf value that makes its rendezvous wait `timeout_s` at most."""
    if nodes.rdzv_endpoint is not None:
        return f"join_timeout={timeout_s},read_timeout={min(timeout_s, C10D_READ_TIMEOUT_S)}"
    return f"timeout={timeout_s}"


def classify(exc: BaseException, handler: object = None) -> RendezvousFailure:
    """The failure that `exc`, raised while the nodes met, stands for. `handler`: the
    rendezvous handler, asked how many nodes had joined a c10d rendezvous."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if "EADDRINUSE" in detail or "address already in use" in detail.lower():
        return RendezvousFailure("port_in_use", detail)
    counted = re.search(r"(\d+)/(\d+) clients joined", detail)
    if counted:
        return RendezvousFailure("timeout", detail, int(counted[1]), int(counted[2]))
    if re.search(r"timed out .*trying to connect|connection refused", detail, re.IGNORECASE):
        return RendezvousFailure("unreachable", detail)
    if type(exc).__name__ == "RendezvousTimeoutError":
        return RendezvousFailure("timeout", detail, _c10d_participants(handler))
    return RendezvousFailure("failed", detail)


def _c10d_participants(handler: object) -> int | None:
    """The nodes in a c10d rendezvous's last known state, this one included (on a timeout it
    has already left). torch keeps them private: None where this torch keeps them elsewhere."""
    state = getattr(getattr(handler, "_state_holder", None), "state", None)
    participants = getattr(state, "participants", None)
    if not isinstance(participants, dict):
        return None
    return len({*participants, getattr(handler, "_this_node", None)} - {None})


def _reporting(get_handler: Callable[[Any], Any], timeout_s: int | None,
               ) -> Callable[[Any], Any]:
    """torch's get_rendezvous_handler, with every failure to meet raised as _NodesDidNotMeet,
    and a meeting that outlasts `timeout_s` (plus GRACE_S) reported by `_give_up`."""

    def get_rendezvous_handler(params: Any) -> Any:
        started = time.monotonic()
        with _deadline(started, timeout_s, None):
            try:
                handler = get_handler(params)  # c10d connects to its store here
            except Exception as exc:
                raise _NodesDidNotMeet(classify(exc)) from exc
        meet = handler.next_rendezvous
        first = [started]  # the first meeting's clock started with the handler

        def next_rendezvous() -> Any:
            with _deadline(first.pop() if first else time.monotonic(), timeout_s, handler):
                try:
                    return meet()
                except Exception as exc:
                    raise _NodesDidNotMeet(classify(exc, handler)) from exc

        handler.next_rendezvous = next_rendezvous
        return handler

    return get_rendezvous_handler


@contextmanager
def _deadline(started: float, timeout_s: int | None, handler: object) -> Iterator[None]:
    """Within this block, `_give_up` once `timeout_s` + GRACE_S have passed since `started`.

    torch's own timeouts normally end the wait first and say more (how many nodes came), but
    a node connecting to node 0 tries twice, each time for the whole timeout."""
    if timeout_s is None:
        yield
        return
    remaining = started + timeout_s + GRACE_S - time.monotonic()
    timer = threading.Timer(max(remaining, 0.0), _give_up, (timeout_s, handler))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _give_up(timeout_s: int, handler: object) -> None:
    """Report that the nodes did not meet in time and end this process at once: torch's wait
    cannot be interrupted, and no rank has been started yet."""
    failure = RendezvousFailure("timeout", f"no rendezvous within {timeout_s} s",
                                _c10d_participants(handler))
    _write_report(failure)
    os._exit(REPORT_EXIT_CODE)


def _write_report(failure: RendezvousFailure) -> bool:
    report = os.environ.get(REPORT_ENV)
    if report:
        Path(report).write_text(json.dumps(asdict(failure)), encoding="utf-8")
    return bool(report)


def _timeout_from(argv: list[str]) -> int | None:
    """The rendezvous timeout that `rendezvous_conf` put into torchrun's arguments."""
    for arg in argv:
        found = re.match(r"--rdzv[-_]conf=(?:.*,)?(?:join_)?timeout=(\d+)", arg)
        if found:
            return int(found[1])
    return None


def main(argv: list[str]) -> int:
    """Run torchrun with `argv`; a failed rendezvous is reported, not raised (see above)."""
    import torch  # noqa: F401  (torch's C++ logging reads TORCH_CPP_LOG_LEVEL here)

    if os.environ.pop(RESTORE_LOG_LEVEL_ENV, None) is not None:
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)  # the ranks log as the user asked
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import registry
    from torch.distributed.run import main as torchrun

    registry.get_rendezvous_handler = _reporting(registry.get_rendezvous_handler,
                                                 _timeout_from(argv))
    try:
        torchrun(argv)
    except _NodesDidNotMeet as exc:
        if not _write_report(exc.failure):
            raise
        return REPORT_EXIT_CODE
    except SignalException as exc:  # the launcher passed on a stop signal; the ranks saved
        return 128 + int(exc.sigval)  # and exited, and the launcher reports how the run ended
    except ChildFailedError as exc:
        # Every rank that failed chose its exit code and said why (a user error's paragraph,
        # 75 after a checkpoint, "another rank ended first"), or was stopped by torchrun
        # (SIGTERM) after that: pass the code on without torchrun's traceback. A rank that
        # raised left an error file, and one killed otherwise (the OOM killer's SIGKILL) has
        # none to say: torchrun's summary shows them.
        failures = [f for f in exc.failures.values() if f.exitcode != -signal.SIGTERM]
        if failures and all(f.exitcode > 0 and not os.path.isfile(f.error_file)
                            for f in failures):
            return max(f.exitcode for f in failures)
        raise
    return 0


def launcher_env(report: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for `main`'s process: where to write its report, and torch's C++ log
    quiet in the launcher alone (its retries while connecting print stack traces) unless the
    user set TORCH_CPP_LOG_LEVEL; the ranks get the user's environment back."""
    env = {**environ, REPORT_ENV: str(report)}
    if "TORCH_CPP_LOG_LEVEL" not in environ:
        env.update({"TORCH_CPP_LOG_LEVEL": "FATAL", RESTORE_LOG_LEVEL_ENV: "1"})
    return env


def read_report(path: Path) -> RendezvousFailure | None:
    """The failure a torchrun started by `main` reported in `path`, or None."""
    try:
        return RendezvousFailure(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def free_port_near(port: int, host: str = "127.0.0.1") -> int | None:
    """A port after `port` that nothing on this machine listens on now, or None."""
    for candidate in range(port + 1, min(port + 50, 65536)):
        with socket.socket() as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return None


def rendezvous_error(failure: RendezvousFailure, nodes: Nodes, timeout_s: int | None,
                     ) -> ConfigError | RendezvousError:
    """The one-paragraph error for a failed rendezvous of `nodes`: a port in use is a usage
    error (ConfigError); nodes that did not meet are a RendezvousError; both exit 2."""
    c10d = nodes.rdzv_endpoint is not None
    if c10d:
        address = nodes.rdzv_endpoint or ""
        port = int(address.rpartition(":")[2])
    else:
        port = nodes.master_port or DEFAULT_MASTER_PORT
        address = f"{nodes.master_addr or '127.0.0.1'}:{port}"
    if failure.kind == "port_in_use":
        flag = f"--rdzv-endpoint {address}" if c10d else f"--master-port {port}"
        free = free_port_near(port)
        example = (f"--rdzv-endpoint {address.rpartition(':')[0]}:{free}" if c10d
                   else f"--master-port {free}") if free else "another port"
        how = (" (the same on every node)" if c10d or nodes.count > 1
               else ", or leave --master-port out and a free port is picked")
        return ConfigError(
            f"{flag}: port {port} is already in use on this machine (another run or program "
            f"listens there), so the run cannot listen on it. Choose a free port, e.g. "
            f"{example}{how}.")
    waited = f"within distributed.timeout_s={timeout_s} s" if timeout_s else "in time"
    came = ""
    if failure.joined is not None:
        came = (f": {failure.joined} of {failure.expected or nodes.count} came"
                f"{' (only this one)' if failure.joined == 1 else ''}")
    host = address.rpartition(":")[0]
    check = (f"that no firewall blocks port {port}; if the nodes start far apart, raise "
             "distributed.timeout_s.")
    other = "" if failure.kind in ("timeout", "unreachable") else f" ({failure.detail})"
    if c10d:
        return RendezvousError(
            f"the nodes did not meet: the c10d rendezvous at {address} did not gather all "
            f"{nodes.count} nodes {waited}{came}{other}. Check that every node is started "
            f"with the same --nnodes {nodes.count} --rdzv-endpoint {address} and the same "
            f"output_dir (or --rdzv-id), that {host} is reachable from every node, and {check}")
    same = f"--nnodes {nodes.count} --master-addr {host} --master-port {port}"
    if failure.kind == "unreachable" or (nodes.rank or 0) != 0:
        return RendezvousError(
            f"the nodes did not meet: node {nodes.rank or 0} of {nodes.count} found no node 0 "
            f"answering at {address} {waited}{other}. Check that node 0 is started (the same "
            f"command with --node-rank 0), that every node gives the same {same} (node 0's "
            f"address and a free port on it), and {check}")
    others = "1" if nodes.count == 2 else f"1 to {nodes.count - 1}"
    return RendezvousError(
        f"the nodes did not meet: node 0 waited at {address} for {nodes.count} nodes "
        f"{waited}{came or ''}{other}. Check that every other node is started with its own "
        f"--node-rank ({others}) and the same {same}, that {host} reaches this "
        f"machine from every node, and {check}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
