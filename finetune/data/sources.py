"""Where rows come from: `data.path` resolved into sources, each with a fingerprint.

A source is what one entry of `data.path` names: local files (a file, a glob or a folder),
`builtin:NAME`, or `hf:NAME` read through `datasets` (a hub dataset, a folder written by
`save_to_disk`, or a folder of data files). Its fingerprint (file sizes and mtimes, or the
dataset's own fingerprint) keys the tokenized-data cache.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

from finetune.data.errors import DataError, RowOrigin
from finetune.data.readers import READ_EXTENSIONS, FilePosition, read_file

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).with_name("bundled")
HF_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
PATH_HINT = ("set data.path to a .jsonl/.json/.csv/.parquet/.txt file, a folder, a glob, "
             "hf:org/name or builtin:instructions")


class SourcePosition(NamedTuple):
    """A streaming cursor: which file of the source, and where in it."""

    file_index: int = 0
    file: FilePosition = FilePosition()

    def to_dict(self) -> dict:
        return {"file_index": self.file_index, "offset": self.file.offset,
                "number": self.file.number}

    @classmethod
    def from_dict(cls, d: dict) -> SourcePosition:
        return cls(int(d["file_index"]), FilePosition(int(d["offset"]), int(d["number"])))


SourceRow = tuple[Any, RowOrigin, SourcePosition]


class Source:
    """One entry of `data.path`. `rows(start)` yields `(row, origin, position after it)`."""

    spec: str

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def rows(self, start: SourcePosition | None = None) -> Iterator[SourceRow]:
        raise NotImplementedError


class FileSource(Source):
    """Local files, read in sorted order."""

    def __init__(self, spec: str, files: list[Path], *, json_key: str | None,
                 text_unit: str) -> None:
        self.spec, self.files = spec, files
        self.json_key, self.text_unit = json_key, text_unit

    def fingerprint(self) -> dict:
        stats = []
        for path in self.files:
            st = path.stat()
            stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": stats, "json_key": self.json_key, "text_unit": self.text_unit}

    def rows(self, start: SourcePosition | None = None) -> Iterator[SourceRow]:
        start = start or SourcePosition()
        for index in range(start.file_index, len(self.files)):
            first = start.file if index == start.file_index else None
            for row, origin, after in read_file(self.files[index], json_key=self.json_key,
                                                text_unit=self.text_unit, start=first):
                yield row, origin, SourcePosition(index, after)

    def __repr__(self) -> str:
        return f"FileSource({self.spec!r}, {len(self.files)} files)"


class HFSource(Source):
    """A `datasets` dataset: a hub id, a `save_to_disk` folder, or a folder of data files."""

    def __init__(self, spec: str, name: str, split: str) -> None:
        self.spec, self.name, self.split = spec, name, split
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_hf_dataset(self.name, self.split)
        return self._dataset

    def fingerprint(self) -> dict:
        return {"hf": self.name, "split": self.split, "fingerprint": self.dataset._fingerprint}

    def rows(self, start: SourcePosition | None = None) -> Iterator[SourceRow]:
        ds = self.dataset
        index = start.file.offset if start else 0
        while index < len(ds):
            chunk = ds[index:index + 1000]
            columns = list(chunk)
            for values in zip(*(chunk[c] for c in columns), strict=True):
                index += 1
                yield (dict(zip(columns, values, strict=True)),
                       RowOrigin(self.spec, index, "record"),
                       SourcePosition(0, FilePosition(index, index + 1)))

    def __repr__(self) -> str:
        return f"HFSource({self.spec!r})"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_hf_dataset(name: str, split: str):
    """Load one split through `datasets`; a clear error when the hub cannot be reached."""
    import datasets

    local = Path(name).expanduser()
    if local.is_dir():
        try:
            if _is_saved_dataset(local):
                loaded = datasets.load_from_disk(str(local))
            else:
                loaded = datasets.load_dataset(str(local), split=split)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"hf:{name}: cannot load this folder with `datasets` ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"hf:{name}: no split {split!r}; the folder has "
                                f"{', '.join(loaded)}. Set data.split=NAME")
            loaded = loaded[split]
        return loaded
    if name.startswith((".", "/", "~")):
        raise DataError(f"data folder not found: {name} (data.path=hf:{name}); check the path")
    offline_fix = (f"save it on a machine with access with `datasets.load_dataset({name!r}, "
                   f"split={split!r}).save_to_disk(DIR)`, copy DIR here and set "
                   "data.path=hf:DIR (or export it to .jsonl and set data.path=FILE)")
    problem = _hub_unreachable()
    if problem:
        raise DataError(f"cannot load hf:{name}: the Hugging Face hub is unreachable ({problem}). "
                        f"To use it offline, {offline_fix}")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "offline" / "not found"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot load hf:{name} (split {split!r}) from the Hugging Face hub: "
                        f"{type(exc).__name__}: {first_line}. If the hub is unreachable from "
                        f"here, {offline_fix}") from None


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, found in seconds (datasets retries for ~30 s), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides; let datasets try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        return f"{url.hostname}: {exc}"
    return None


def _hint(key: str) -> str:
    return PATH_HINT.replace("data.path", key)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        or (path / "tokenizer.json").is_file())


def _files_for(spec: str, key: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in READ_EXTENSIONS]
        if not files:
            raise DataError(f"no data files match {spec!r} ({key}); {_hint(key)}")
        return files
    path = Path(spec).expanduser()
    if path.is_dir() and _is_model_folder(path):
        raise DataError(f"{key}={spec} is a model folder (config.json and weights or a "
                        "tokenizer), not training data. Set model.name_or_path to it, and "
                        f"{key} to your data file or folder.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in READ_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"folder {path} ({key}) holds no data files ending in "
                            f"{', '.join(READ_EXTENSIONS)}")
        return files
    if not path.exists():
        raise DataError(f"data file not found: {path} ({key}={spec!r}); {_hint(key)}")
    if path.suffix.lower() not in READ_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; data files must end in "
                        f"one of {', '.join(READ_EXTENSIONS)}")
    return [path]


def path_list(value: Any, key: str = "data.path") -> list[str]:
    """`data.path` (one string or a list of them) as a list of strings."""
    if value is None or value == "???" or value == "":
        raise DataError(f"{key} is not set; {PATH_HINT}")
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) or hasattr(value, "__iter__"):
        items = [str(v) for v in value]
        if not items:
            raise DataError(f"{key} is an empty list; {PATH_HINT}")
        return items
    raise DataError(f"{key} must be a string or a list of strings, got {type(value).__name__}")


def resolve_source(spec: str, *, split: str, json_key: str | None, text_unit: str,
                   key: str = "data.path") -> Source:
    """Turn one `data.path` (or `key`) entry into a Source (errors name the entry and how to
    fix it)."""
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX):].strip()
        if not name:
            raise DataError("data.path=hf: needs a dataset name, e.g. hf:tatsu-lab/alpaca")
        return HFSource(spec, name, split)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        path = BUNDLED_DIR / f"{name}.jsonl"
        if not path.is_file():
            known = sorted(p.stem for p in BUNDLED_DIR.glob("*.jsonl"))
            raise DataError(f"unknown built-in dataset {spec!r}; known: "
                            f"{', '.join('builtin:' + k for k in known)}")
        return FileSource(spec, [path], json_key=json_key, text_unit=text_unit)
    return FileSource(spec, _files_for(spec, key), json_key=json_key, text_unit=text_unit)


def shared_source(train: list[Source], held_out: list[Source]) -> str | None:
    """A file or dataset that both `train` and `held_out` read (the same file however it is
    named: links and relative paths included), as the held-out side names it; None if none."""
    seen = {key for source in train for key, _ in _identities(source)}
    for source in held_out:
        for key, name in _identities(source):
            if key in seen:
                return name
    return None


def _identities(source: Source) -> list[tuple[tuple, str]]:
    """(what identifies it, its name) of each file or dataset `source` reads."""
    if isinstance(source, HFSource):
        local = Path(source.name).expanduser()
        name = str(local.resolve()) if local.is_dir() else source.name
        return [(("hf", name, source.split), source.spec)]
    if isinstance(source, FileSource):
        return [((st.st_dev, st.st_ino), str(path))
                for path, st in ((p, p.stat()) for p in source.files)]
    return []
