"""Crash-safe file primitives: fsync'd writes, sha256 manifests, atomic directory publish."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

MANIFEST = "manifest.json"


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: object) -> None:
    """Write JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, extra: dict) -> None:
    """Checksum every file in `directory` and write the manifest last: it marks completeness."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            fsync_path(path)
            files[str(path.relative_to(directory))] = {
                "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json(directory / MANIFEST, {"format": 1, "files": files, **extra})
    fsync_path(directory)


def verify_manifest(directory: Path) -> str | None:
    """Return None when the checkpoint is complete and intact, else why it is not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def publish_directory(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place and make the rename durable."""
    os.replace(tmp, final)
    fsync_path(final.parent)


def new_temp_path(parent: Path, prefix: str, suffix: str = "", *, folder: bool = False) -> Path:
    """Create a new, uniquely named empty file (or folder) in `parent` and return its path.

    Unlike tempfile's mkstemp and mkdtemp, which make private files (0600) and folders (0700),
    it honours the umask, as every other file a run writes does: a folder renamed into place
    as a run's final/ or a merged model is readable by whoever may read the run's checkpoints.
    OSError when `parent` cannot be written.
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                path.mkdir(mode=0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name like {prefix}*{suffix} in {parent}")


def share_as_umask_allows(folder: Path) -> None:
    """Give `folder`, and every file and folder in it, the permissions the umask allows (files
    0644 and folders 0755 under umask 022). Libraries that write through a private temporary
    file (safetensors' save_file makes its files 0600) would otherwise leave a model that
    only its owner can read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
