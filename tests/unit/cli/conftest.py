"""Run `finetune.cli.main` in this process and read what it printed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from finetune.cli import main


class Result(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """main() points the `finetune` logger at this test's captured stderr; undo that after."""
    log = logging.getLogger("finetune")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """cli(*args) -> Result(exit code, stdout, stderr) of `finetune ARGS...`."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run
