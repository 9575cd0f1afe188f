"""The tokenized-data cache: one folder per source key, written atomically.

The key (finetune.data.ingest.source_key) hashes everything that changes the tokens: the source
fingerprint (each file's path, size and mtime, or the `datasets` fingerprint), the tokenizer
(its full serialisation, special tokens and the chat template in use) and the settings (format,
columns, max_seq_len, truncation, train_on, on_bad_row). An entry is written into a temporary
folder and renamed into place, so a crash or a concurrent rank never leaves a half-written
entry; `meta.json` is written last. Entries are kept apart by ENTRY_VERSION too, so an entry
whose row counts follow older rules is never read back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.tokenized import TokenizedRows

logger = logging.getLogger(__name__)

_ARRAYS = ("tokens", "trained", "offsets")
ENTRY_VERSION = 2  # bump when the same key's entry means other things (2: each row counted once)


def default_cache_dir(setting: Any = None) -> Path:
    """data.cache_dir, else $FINETUNE_CACHE/data, else ~/.cache/finetune/data."""
    if setting:
        return Path(str(setting)).expanduser()
    env = os.environ.get("FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "finetune") / "data"


class TokenCache:
    """Load and store TokenizedRows (+ a JSON meta dict) under a key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _folder(self, key: str) -> Path:
        return self.root / f"{key}.v{ENTRY_VERSION}"

    def load(self, key: str) -> tuple[TokenizedRows, dict] | None:
        folder = self._folder(key)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS]
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache entry %s (%s)", folder, exc)
            return None
        return TokenizedRows(*arrays), meta

    def store(self, key: str, rows: TokenizedRows, meta: dict) -> Path | None:
        target = self._folder(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        except OSError as exc:
            logger.warning("cannot write the data cache in %s (%s); continuing without it",
                           self.root, exc)
            return None
        try:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(rows, name)))
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "meta.json").is_file():  # not a concurrent writer: real error
                    raise
            return target
        except OSError as exc:
            logger.warning("cannot write the data cache entry %s (%s)", target, exc)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
