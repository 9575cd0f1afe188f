"""The one error type of the data pipeline, and where a row came from.

`DataError` is the user-facing error (exit code 2); `BadRow` is raised for one row inside the
pipeline and becomes a located DataError or a counted skip (data.on_bad_row).
"""

from __future__ import annotations

from typing import NamedTuple

from finetune.errors import FinetuneError


class DataError(FinetuneError, ValueError):
    """Bad data or a data setting that cannot work; the message is written for the user.

    It names the file and 1-based line (or record) when a row is at fault, the field or setting
    involved, and what to do about it. The command line exits with code 2 on it.
    """

    exit_code = 2


class RowOrigin(NamedTuple):
    """Where a row was read: `file:line` for text files, `file:record N` for the others."""

    source: str
    index: int  # 1-based line number (jsonl, csv, txt) or record number (json, parquet, hf)
    unit: str = "line"

    def __str__(self) -> str:
        if self.unit == "line":
            return f"{self.source}:{self.index}"
        return f"{self.source}: {self.unit} {self.index}"


class BadRow(Exception):
    """Raised inside the pipeline for one row; turned into a DataError or a counted skip.

    `reason` is a short key counted in the stats when rows are skipped (`malformed_json`,
    `missing_field`, ...); `message` says what is wrong, without the location; `fix` how to
    repair the row. A skipped row is reported with its message only; an error adds the fix and
    the skip setting.
    """

    def __init__(self, reason: str, message: str, fix: str = "fix the row") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.fix = fix

    def at(self, origin: RowOrigin) -> DataError:
        return DataError(f"{origin}: {self.message}. To fix it: {self.fix}; or set "
                         "data.on_bad_row=skip to skip such rows (they are counted).")
