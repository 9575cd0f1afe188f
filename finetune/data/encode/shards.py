"""Tokenizing one large local source in several processes.

The fast tokenizer releases the GIL, but reading, converting and rendering rows is Python that
holds it, so threads alone leave part of each core idle. A source made of line-based files
(.jsonl, or .txt read a line at a time) is therefore cut at line starts into pieces of about
equal size, PIECES_PER_PROCESS per process. The calling process and the forked ones take the
next piece until none is left (so a process that runs slower gets fewer), and the pieces are
joined in file order. The rows, the counts, the line numbers in messages and the error raised
are those of a one-process run.

Forking is used on Linux only (where it is cheap and the default for `datasets.map(num_proc=)`),
for sources of at least MIN_SHARD_BYTES per process, and when `data.num_proc` (0: one per
usable CPU) allows more than one process. A child runs only Python and the tokenizer, with the
tokenizer's own thread pool off, and ends through os._exit (as multiprocessing does), so no
exit handler of the parent's libraries runs in it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from finetune.data.encode.cpus import single_threaded_tokenizer, usable_cpus
from finetune.data.errors import DataError
from finetune.data.readers import FilePosition
from finetune.data.sources import FileSource, Source, SourcePosition, SourceRow
from finetune.data.tokenized import RowCounts, TokenizedRows

logger = logging.getLogger(__name__)

MIN_SHARD_BYTES = 1 << 20  # below ~5k rows per process, forking costs more than it saves
PIECES_PER_PROCESS = 4


class ShardPlan(NamedTuple):
    """How many processes tokenize the source, and where each piece starts (in file order)."""

    processes: int
    starts: list[SourcePosition]


def can_fork() -> bool:
    """Linux, and not inside a daemonic process (which may not have children)."""
    return (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and not mp.current_process().daemon)


def plan_shards(source: Source, num_proc: int) -> ShardPlan | None:
    """The pieces `source` is cut into, or None when one process tokenizes it (the source
    cannot be cut at line starts, or is too small for the processes to pay off)."""
    processes = num_proc or usable_cpus()
    if (processes < 2 or not can_fork() or not isinstance(source, FileSource)
            or not all(_line_based(path, source.text_unit) for path in source.files)):
        return None
    sizes = [path.stat().st_size for path in source.files]
    total = sum(sizes)
    processes = min(processes, total // MIN_SHARD_BYTES)
    if processes < 2:
        return None
    pieces = processes * PIECES_PER_PROCESS
    starts = _line_starts(source.files, sizes, [k * total // pieces for k in range(pieces)])
    return ShardPlan(processes, starts)


def _line_based(path: Path, text_unit: str) -> bool:
    suffix = path.suffix.lower()
    return suffix == ".jsonl" or (suffix == ".txt" and text_unit == "line")


def _line_starts(files: list[Path], sizes: list[int], targets: list[int]) -> list[SourcePosition]:
    """The first line start at or after each target byte (increasing) of the files taken end to
    end, with its 1-based line number; duplicates and the end of the data are left out."""
    starts: list[SourcePosition] = []
    index, base = 0, 0  # the file holding the target, and where it begins end to end
    counted, number = 0, 1  # newlines of that file are counted up to byte `counted`
    for target in targets:
        while index < len(files) and target >= base + sizes[index]:
            base += sizes[index]
            index += 1
            counted, number = 0, 1
        if index == len(files):
            break
        position = SourcePosition(index, FilePosition())
        if target > base:
            with open(files[index], "rb") as f:
                f.seek(target - base - 1)
                f.readline()  # to the end of the line holding the byte before the target
                offset = f.tell()
                f.seek(counted)
                while counted < offset:
                    block = f.read(min(offset - counted, 1 << 24))
                    number += block.count(b"\n")
                    counted += len(block)
            position = (SourcePosition(index, FilePosition(offset, number))
                        if offset < sizes[index] else SourcePosition(index + 1, FilePosition()))
        if (not starts or position > starts[-1]) and position.file_index < len(files):
            starts.append(position)
    return starts


def rows_between(source: Source, start: SourcePosition,
                 stop: SourcePosition | None) -> Iterator[SourceRow]:
    """The rows of `source` whose lines start at or after `start` and before `stop` (a line
    start, so a row is before it exactly when the position after the row is not past it)."""
    for row, origin, after in source.rows(start):
        if stop is not None and after > stop:
            return
        yield row, origin, after


Tokenize = Callable[..., tuple[TokenizedRows, RowCounts]]  # (rows, *, threads) -> result
Report = Callable[[int, str, Any], None]  # (piece, "ok" | "data_error" | "crash", payload)


def tokenize_in_shards(source: Source, plan: ShardPlan,
                       tokenize: Tokenize) -> tuple[TokenizedRows, RowCounts]:
    """Run `tokenize` on every piece of `source`, in plan.processes processes (this one too)."""
    starts = plan.starts
    stops: list[SourcePosition | None] = [*starts[1:], None]
    context = mp.get_context("fork")
    next_piece = context.Value("i", 0)
    results: dict[int, tuple[str, Any]] = {}

    def report(piece: int, kind: str, payload: Any) -> None:
        results[piece] = (kind, payload)

    children, readers = [], []
    with single_threaded_tokenizer():
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns on any fork of a threaded process; the child touches none of
                # the other threads' state (see the module docstring).
                warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                for _ in range(plan.processes - 1):
                    receive, send = context.Pipe(duplex=False)
                    child = context.Process(target=_child, daemon=True,
                                            args=(send, source, starts, stops, tokenize,
                                                  next_piece))
                    child.start()
                    send.close()
                    children.append((child, receive))
            for _, receive in children:  # results are taken in as they come: no child waits
                reader = threading.Thread(target=_receive, args=(receive, report), daemon=True)
                reader.start()
                readers.append(reader)
            logger.info("%s: tokenizing in %d processes", source.spec, plan.processes)
            _take_pieces(source, starts, stops, tokenize, next_piece, report)
            for reader in readers:
                reader.join()
        finally:
            for child, receive in children:
                if child.is_alive():
                    child.terminate()
                child.join()
                receive.close()
    parts = []
    for piece, start in enumerate(starts):
        kind, payload = results.get(piece, ("crash", "its process exited before reporting"))
        if kind == "data_error":
            raise DataError(payload)
        if kind == "crash":
            logger.warning("the process tokenizing from %s on failed; tokenizing that part here "
                           "instead. %s", _where(source, start), payload.strip().splitlines()[-1])
            payload = tokenize(rows_between(source, start, stops[piece]), threads=True)
        parts.append(payload)
    counts = RowCounts()
    for _, part_counts in parts:
        counts.merge(part_counts)
    return TokenizedRows.concat([rows for rows, _ in parts]), counts


def _take_pieces(source: Source, starts: list[SourcePosition],
                 stops: list[SourcePosition | None], tokenize: Tokenize, next_piece: Any,
                 report: Report, *, in_child: bool = False) -> None:
    """Tokenize the next piece nobody has taken, until none is left. After a DataError no more
    are taken: every earlier piece is already taken, so the first error is still found. In a
    child, any other failure is reported too (the parent redoes the piece)."""
    while True:
        with next_piece.get_lock():
            piece = next_piece.value
            if piece >= len(starts):
                return
            next_piece.value = piece + 1
        try:
            result = tokenize(rows_between(source, starts[piece], stops[piece]), threads=False)
        except DataError as exc:
            report(piece, "data_error", str(exc))
            with next_piece.get_lock():
                next_piece.value = len(starts)
            return
        except BaseException:
            if not in_child:
                raise
            report(piece, "crash", traceback.format_exc())
            return
        report(piece, "ok", result)


def _child(send: Any, source: Source, starts: list[SourcePosition],
           stops: list[SourcePosition | None], tokenize: Tokenize, next_piece: Any) -> None:
    try:
        _take_pieces(source, starts, stops, tokenize, next_piece,
                     lambda *message: send.send(message), in_child=True)
        send.send(None)
    finally:
        send.close()


def _receive(receive: Any, report: Report) -> None:
    """Take a child's results until it says it is done (None) or its end of the pipe closes."""
    while True:
        try:
            message = receive.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        report(*message)


def _where(source: Source, start: SourcePosition) -> str:
    if isinstance(source, FileSource) and start.file_index < len(source.files):
        return f"{source.files[start.file_index]}:{start.file.number}"
    return source.spec
