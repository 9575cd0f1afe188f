"""How a multi-process run ends when a rank stops: the code the rank chose reaches the user
without torchrun's traceback, a rank whose peer is gone says so in one line, and a rank that
raised (or was killed) keeps torchrun's summary."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous import registry

import finetune.cli
from finetune.commands import run as run_command
from finetune.train import rendezvous


def _torchrun_failing_with(monkeypatch: pytest.MonkeyPatch, *failures: ProcessFailure) -> None:
    def torchrun(_argv: list[str]) -> None:
        raise ChildFailedError("finetune.commands.run", dict(enumerate(failures)))

    monkeypatch.setattr("torch.distributed.run.main", torchrun)
    # main wraps torch's rendezvous registry; put it back afterwards
    monkeypatch.setattr(registry, "get_rendezvous_handler", registry.get_rendezvous_handler)


def _failure(rank: int, exitcode: int, error_file: str = "<N/A>") -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                          error_file=error_file)


def test_ranks_that_chose_their_exit_code_pass_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 0: a user error (2); rank 1: "another rank ended first" (1), or stopped by torchrun
    _torchrun_failing_with(monkeypatch, _failure(0, 2), _failure(1, 1))
    assert rendezvous.main(["--standalone"]) == 2
    _torchrun_failing_with(monkeypatch, _failure(0, 75), _failure(1, -signal.SIGTERM))
    assert rendezvous.main(["--standalone"]) == 75


@pytest.mark.parametrize("why", ["raised", "killed"])
def test_a_rank_that_raised_or_was_killed_keeps_torchruns_summary(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, why: str) -> None:
    error_file = tmp_path / "error.json"
    error_file.write_text('{"message": {"message": "RuntimeError: boom", "extraInfo": '
                          '{"py_callstack": "", "timestamp": "1"}}}')
    crashed = (_failure(1, 1, str(error_file)) if why == "raised"
               else _failure(1, -signal.SIGKILL))
    _torchrun_failing_with(monkeypatch, _failure(0, 1), crashed)
    with pytest.raises(ChildFailedError):
        rendezvous.main(["--standalone"])


def test_a_rank_whose_peer_is_gone_says_so_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", "1")

    def peer_gone(argv: list[str] | None = None) -> int:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:11999")

    monkeypatch.setattr(finetune.cli, "main", peer_gone)
    assert run_command.rank_main() == 1
    err = capsys.readouterr().err
    assert err == ("error: rank 1 stopped because another rank of the run ended first (that "
                   "rank's message is above)\n")

    def bug(argv: list[str] | None = None) -> int:
        raise RuntimeError("a bug of this rank")

    monkeypatch.setattr(finetune.cli, "main", bug)
    with pytest.raises(RuntimeError, match="a bug of this rank"):
        run_command.rank_main()
