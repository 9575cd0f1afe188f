"""Row readers for local files: .jsonl, .json, .csv, .parquet and .txt.

Each reader yields `(row, origin, resume_at)`: the row as a dict (or a `BadRow` saying what is
wrong with it), where it came from, and the position just after it. A position is a byte offset
for the line-based formats (.jsonl, .csv, .txt) and a record index for the others, so a
streaming run can reopen a file exactly where it stopped without reading what came before.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from finetune.config.data import TextUnit
from finetune.data.errors import BadRow, DataError, RowOrigin
from finetune.data.settings import setting_choice

READ_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class FilePosition(NamedTuple):
    """Where to resume reading a file: byte offset or record index, and the 1-based number of the
    next line or record (kept so messages still name the right line after a resume)."""

    offset: int = 0
    number: int = 1


RowItem = tuple[Any, RowOrigin, FilePosition]


def read_file(path: Path, *, json_key: str | None = None, text_unit: str = "line",
              start: FilePosition | None = None) -> Iterator[RowItem]:
    """Yield the rows of one data file from `start` (default: the beginning)."""
    start = start or FilePosition()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, start)
    if suffix == ".json":
        return _read_json(path, json_key, start)
    if suffix == ".csv":
        return _read_csv(path, start)
    if suffix == ".parquet":
        return _read_parquet(path, start)
    if suffix == ".txt":
        return _read_txt(path, text_unit, start)
    raise DataError(f"{path}: unsupported file type {suffix!r}; data files must end in one of "
                    f"{', '.join(READ_EXTENSIONS)} (or use data.path=hf:... for other formats)")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow("invalid_utf8", f"invalid UTF-8 (byte {exc.start + 1} of the line)",
                     "re-encode the file as UTF-8") from None


def _numbered_lines(path: Path,
                    start: FilePosition) -> Iterator[tuple[bytes, RowOrigin, FilePosition]]:
    """Raw lines from `start` on, each with its 1-based origin and the position after it."""
    source = str(path)
    offset, number = start.offset, start.number
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            origin = RowOrigin(source, number)
            number += 1
            yield raw, origin, FilePosition(offset, number)


def _read_jsonl(path: Path, start: FilePosition) -> Iterator[RowItem]:
    import orjson  # here, not at the top: importing finetune.data (the collator) needs no orjson

    for raw, origin, resume in _numbered_lines(path, start):
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError:  # or blank, or valid only to json (NaN, huge integers)
            if not raw.strip():
                continue
            row = _json_line(raw)
        if not isinstance(row, (dict, BadRow)):
            row = BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}",
                         "make each line one object like {\"field\": ...}")
        yield row, origin, resume


def _json_line(raw: bytes) -> Any:
    """Parse a line with the standard library, for its messages; a BadRow says what is wrong."""
    try:
        return json.loads(_decode(raw))
    except BadRow as bad:
        return bad
    except json.JSONDecodeError as exc:
        return BadRow("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})",
                      "fix the line")


def _records_in(data: Any, path: Path, json_key: str | None) -> list:
    if json_key is not None:
        if not isinstance(data, dict) or json_key not in data:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{path}: data.json_key={json_key!r} not found; the file holds {found}")
        data = data[json_key]
    elif isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object must hold the records under one key; found "
                            f"list keys {lists or 'none'}. Set data.json_key=KEY")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _read_json(path: Path, json_key: str | None, start: FilePosition) -> Iterator[RowItem]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 at byte {exc.start}; re-encode the file as UTF-8"
                        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        "fix the file (a whole .json file cannot be skipped row by row; .jsonl can)"
                        ) from None
    records = _records_in(data, path, json_key)
    source = str(path)
    for index in range(start.offset, len(records)):
        row = records[index]
        if not isinstance(row, dict):
            row = BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}",
                         "make each record an object like {\"field\": ...}")
        yield row, RowOrigin(source, index + 1, "record"), FilePosition(index + 1, index + 2)


class _LineFeed:
    """Feeds decoded lines to csv.reader while counting bytes and lines consumed.

    csv.reader pulls one physical line at a time and never reads ahead, so after each record
    `offset` is the byte offset of the next record and `lines` the lines read so far (a quoted
    field may span several lines).
    """

    def __init__(self, f: io.BufferedReader, offset: int, lines: int) -> None:
        self.f, self.offset, self.lines = f, offset, lines

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            self.offset += len(raw)
            self.lines += 1
            yield raw.decode("utf-8")


def _read_csv(path: Path, start: FilePosition) -> Iterator[RowItem]:
    source = str(path)
    with open(path, "rb") as f:
        feed = _LineFeed(f, 0, 0)
        try:
            header = next(csv.reader(feed), None)
        except UnicodeDecodeError:
            raise DataError(f"{path}:1: invalid UTF-8 in the header; re-encode the file as UTF-8"
                            ) from None
        except csv.Error as exc:
            raise DataError(f"{path}:1: malformed CSV header ({exc})") from None
        if header is None:
            return
        if start.offset > feed.offset:
            f.seek(start.offset)
            feed = _LineFeed(f, start.offset, start.number - 1)
        reader = csv.reader(feed)
        while True:
            first_line = feed.lines + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise DataError(f"{path}:{feed.lines}: invalid UTF-8; re-encode the file as UTF-8"
                                ) from None
            except csv.Error as exc:
                raise DataError(f"{path}:{first_line}: malformed CSV ({exc})") from None
            resume = FilePosition(feed.offset, feed.lines + 1)
            if not values:
                continue
            if len(values) != len(header):
                row: Any = BadRow("wrong_column_count", f"expected {len(header)} CSV fields "
                                  f"({', '.join(header)}), found {len(values)}",
                                  "quote values that hold commas or line breaks")
            else:
                row = dict(zip(header, values, strict=True))
            yield row, RowOrigin(source, first_line), resume


def _read_parquet(path: Path, start: FilePosition) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    source = str(path)
    skip, first_group, index = start.offset, 0, 0
    meta = pf.metadata
    while first_group < meta.num_row_groups and skip >= index + meta.row_group(first_group).num_rows:
        index += meta.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, meta.num_row_groups))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
        for row in batch.to_pylist():
            index += 1
            if index <= skip:
                continue
            yield row, RowOrigin(source, index, "record"), FilePosition(index, index + 1)


def _read_txt(path: Path, unit: str, start: FilePosition) -> Iterator[RowItem]:
    unit = setting_choice(TextUnit, unit, "text_unit")
    source = str(path)
    if unit == "file":
        if start.offset:
            return
        try:
            text = _decode(path.read_bytes())
        except BadRow as bad:
            yield bad, RowOrigin(source, 1), FilePosition(1, 2)
            return
        if text.strip():
            yield {"text": text.rstrip("\n")}, RowOrigin(source, 1), FilePosition(1, 2)
        return
    para: list[str] = []
    para_start = start.number
    resume = start
    for raw, origin, resume in _numbered_lines(path, start):
        try:
            line = _decode(raw).rstrip("\r\n")
        except BadRow as bad:
            yield bad, origin, resume
            para = []
            continue
        if unit == "line":
            if line.strip():
                yield {"text": line}, origin, resume
            continue
        if line.strip():
            if not para:
                para_start = origin.index
            para.append(line)
        elif para:
            yield {"text": "\n".join(para)}, RowOrigin(source, para_start), resume
            para = []
    if para:
        yield {"text": "\n".join(para)}, RowOrigin(source, para_start), resume
