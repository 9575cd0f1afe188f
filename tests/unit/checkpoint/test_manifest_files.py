"""The manifest lists every file of a checkpoint, those in sub-folders (a sharded checkpoint's
shards) included, never a folder or an older manifest, and verifies them."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.checkpoint.files import MANIFEST, verify_manifest, write_manifest


def test_files_in_sub_folders_are_listed_and_folders_and_old_manifests_are_not(
        tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.distcp").write_bytes(b"abc")
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / MANIFEST).write_text('{"stale": true}')
    write_manifest(tmp_path, {"step": 3})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["shards/part-0.distcp", "state.json"]
    assert manifest["files"]["shards/part-0.distcp"]["bytes"] == 3
    assert manifest["step"] == 3
    assert verify_manifest(tmp_path) is None
    (tmp_path / "shards" / "part-0.distcp").write_bytes(b"abd")
    assert verify_manifest(tmp_path) == "shards/part-0.distcp does not match its checksum"
