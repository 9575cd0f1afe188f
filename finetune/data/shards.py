"""Tokenizing one large local source in several processes.

The fast tokenizer releases the GIL, but reading, converting and rendering rows is Python that
holds it, so threads alone leave part of each core idle. A source made of line-based files
(.jsonl, or .txt read a line at a time) is therefore cut at line starts into byte ranges of
about equal size: the calling process tokenizes the first range and one forked process each of
the others, and the pieces are joined in file order. The rows, the counts, the line numbers in
messages and the error raised are those of a one-process run.

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
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finetune.data.errors import DataError
from finetune.data.readers import FilePosition
from finetune.data.sources import FileSource, Source, SourcePosition, SourceRow
from finetune.data.tokenized import (
    RowCounts,
    TokenizedRows,
    single_threaded_tokenizer,
    usable_cpus,
)

logger = logging.getLogger(__name__)

MIN_SHARD_BYTES = 1 << 20  # below ~5k rows per process, forking costs more than it saves


def can_fork() -> bool:
    """Linux, and not inside a daemonic process (which may not have children)."""
    return (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and not mp.current_process().daemon)


def shard_starts(source: Source, num_proc: int) -> list[SourcePosition]:
    """Where each shard of `source` starts (the first at the beginning); one shard when the
    source cannot be cut at line starts or is too small for the processes to pay off."""
    processes = num_proc or usable_cpus()
    if (processes < 2 or not can_fork() or not isinstance(source, FileSource)
            or not all(_line_based(path, source.text_unit) for path in source.files)):
        return [SourcePosition()]
    sizes = [path.stat().st_size for path in source.files]
    total = sum(sizes)
    shards = min(processes, total // MIN_SHARD_BYTES)
    starts = [SourcePosition()]
    for k in range(1, shards):
        position = _line_start_at(source.files, sizes, k * total // shards)
        if position > starts[-1]:
            starts.append(position)
    return starts


def _line_based(path: Path, text_unit: str) -> bool:
    suffix = path.suffix.lower()
    return suffix == ".jsonl" or (suffix == ".txt" and text_unit == "line")


def _line_start_at(files: list[Path], sizes: list[int], byte: int) -> SourcePosition:
    """The first line start at or after `byte` of the files taken end to end, with its
    1-based line number."""
    index = 0
    while byte >= sizes[index]:
        byte -= sizes[index]
        index += 1
        if index == len(files):
            return SourcePosition(index, FilePosition())
    if byte == 0:
        return SourcePosition(index, FilePosition())
    with open(files[index], "rb") as f:
        f.seek(byte - 1)
        f.readline()  # to the end of the line holding byte - 1
        offset = f.tell()
        if offset >= sizes[index]:
            return SourcePosition(index + 1, FilePosition())
        f.seek(0)
        number, left = 1, offset
        while left:
            block = f.read(min(left, 1 << 24))
            number += block.count(b"\n")
            left -= len(block)
    return SourcePosition(index, FilePosition(offset, number))


def rows_between(source: Source, start: SourcePosition,
                 stop: SourcePosition | None) -> Iterator[SourceRow]:
    """The rows of `source` whose lines start at or after `start` and before `stop` (a line
    start, so a row is before it exactly when the position after the row is not past it)."""
    for row, origin, after in source.rows(start):
        if stop is not None and after > stop:
            return
        yield row, origin, after


Tokenize = Callable[..., tuple[TokenizedRows, RowCounts]]  # (rows, *, threads) -> result


def tokenize_in_shards(source: Source, starts: list[SourcePosition],
                       tokenize: Tokenize) -> tuple[TokenizedRows, RowCounts]:
    """Run `tokenize` on each shard of `source` in its own process (the first in this one)."""
    stops: list[SourcePosition | None] = [*starts[1:], None]
    context = mp.get_context("fork")
    children = []
    with single_threaded_tokenizer():
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns on any fork of a threaded process; the child touches none of
                # the other threads' state (see the module docstring).
                warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                for start, stop in zip(starts[1:], stops[1:], strict=True):
                    receive, send = context.Pipe(duplex=False)
                    child = context.Process(target=_child, daemon=True,
                                            args=(send, source, start, stop, tokenize))
                    child.start()
                    send.close()
                    children.append((child, receive, start, stop))
            logger.info("%s: tokenizing in %d processes", source.spec, len(starts))
            parts = [tokenize(rows_between(source, starts[0], stops[0]), threads=False)]
            for child, receive, start, stop in children:
                parts.append(_collect(child, receive, source, start, stop, tokenize))
        finally:
            for child, receive, _, _ in children:
                receive.close()
                if child.is_alive():
                    child.terminate()
                child.join()
    counts = RowCounts()
    for _, part_counts in parts:
        counts.merge(part_counts)
    return TokenizedRows.concat([rows for rows, _ in parts]), counts


def _child(send: Any, source: Source, start: SourcePosition, stop: SourcePosition | None,
           tokenize: Tokenize) -> None:
    try:
        result = tokenize(rows_between(source, start, stop), threads=False)
        send.send(("ok", result))
    except DataError as exc:
        send.send(("data_error", str(exc)))
    except BaseException:  # reported to the parent, which tokenizes this shard itself
        send.send(("crash", traceback.format_exc()))
    finally:
        send.close()


def _collect(child: Any, receive: Any, source: Source, start: SourcePosition,
             stop: SourcePosition | None, tokenize: Tokenize) -> tuple[TokenizedRows, RowCounts]:
    """A child's result; DataErrors are raised here, in file order. If the child died or
    failed for another reason, its shard is tokenized again in this process."""
    try:
        kind, payload = receive.recv()
    except EOFError:
        child.join()
        kind, payload = "crash", f"the process exited with code {child.exitcode}"
    if kind == "ok":
        return payload
    if kind == "data_error":
        raise DataError(payload)
    where = (f"{source.files[start.file_index]}:{start.file.number}"
             if isinstance(source, FileSource) else source.spec)
    logger.warning("the process tokenizing from %s on failed; tokenizing that part here "
                   "instead. %s", where, payload.strip().splitlines()[-1])
    return tokenize(rows_between(source, start, stop), threads=True)
