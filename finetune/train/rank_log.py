"""Each rank's own log file: OUTPUT_DIR/logs/rank_K.log, K the global rank.

With many processes only rank 0 speaks on the console; when rank 13 of 16 fails, its file still
holds what it logged and the error that ended it, after the job and its console are gone. The
file gets the records of the `finetune` loggers at their level and other libraries' warnings
(torch.distributed's included), opens with a line naming the rank, host and process id, and is
appended to, so a resumed run continues it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.errors import FinetuneError

LOG_DIR = "logs"
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def rank_log_path(run_dir: Path, rank: int) -> Path:
    """Where rank `rank` of the run in `run_dir` logs."""
    return run_dir / LOG_DIR / f"rank_{rank}.log"


def attach_rank_log(run_dir: Path, rank: int) -> logging.Handler:
    """Start appending this process's log records to run_dir/logs/rank_{rank}.log.

    Call it once every rank has checked output_dir (a file appearing there earlier would look
    like a previous run to a slower rank). Returns the handler to give to `detach_rank_log`.
    """
    path = rank_log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
    local = os.environ.get("LOCAL_RANK")
    where = f"on {socket.gethostname()}" + (f" (local rank {local})" if local else "")
    _write(handler, logging.INFO, f"rank {rank} of {os.environ.get('WORLD_SIZE', '1')} {where}, "
                                  f"pid {os.getpid()}")
    for log in [logging.getLogger(), *_isolated_loggers()]:
        log.addHandler(handler)
    return handler


def detach_rank_log(handler: logging.Handler, error: BaseException | None = None) -> None:
    """Stop logging to the rank's file and close it; with `error`, first write what ended the
    run: a FinetuneError's message, any other exception's traceback."""
    if isinstance(error, FinetuneError):
        _write(handler, logging.ERROR, f"error: {error}")
    elif isinstance(error, KeyboardInterrupt):
        _write(handler, logging.ERROR, "interrupted (Ctrl-C)")
    elif isinstance(error, SystemExit):  # e.g. submitit exiting once it requeued the job
        _write(handler, logging.INFO, f"exiting (exit code {error.code})")
    elif error is not None:
        _write(handler, logging.ERROR, "the run failed:",
               exc_info=(type(error), error, error.__traceback__))
    for log in [logging.getLogger(), *_loggers()]:
        log.removeHandler(handler)
    handler.close()


@contextmanager
def rank_log(run_dir: Path, rank: int) -> Iterator[logging.Handler]:
    """`attach_rank_log` for the body of a with-statement; an exception leaving it is written
    to the file before it propagates."""
    handler = attach_rank_log(run_dir, rank)
    try:
        yield handler
    except BaseException as exc:
        detach_rank_log(handler, exc)
        raise
    detach_rank_log(handler)


def _loggers() -> list[logging.Logger]:
    return [log for log in logging.Logger.manager.loggerDict.values()
            if isinstance(log, logging.Logger)]


def _isolated_loggers() -> list[logging.Logger]:
    """Loggers whose records stop before the root logger (propagate=False): `finetune` under
    the command line, torch's own (torch.distributed among them). Each one covers its branch
    down to the next such logger, so no record reaches the file twice."""
    return [log for log in _loggers() if not log.propagate]


def _write(handler: logging.Handler, level: int, message: str, exc_info: object = None) -> None:
    """Write to this file only, whatever the loggers' levels (the console has its own say)."""
    record = logging.LogRecord(__name__, level, __file__, 0, message, None, exc_info)
    handler.handle(record)


__all__ = ["LOG_DIR", "attach_rank_log", "detach_rank_log", "rank_log", "rank_log_path"]
