"""final/ and a merged folder are written like checkpoints: with the umask's permissions, and a
failure (a full disk, a place that cannot be written) leaves nothing behind and every earlier
result intact."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from finetune.adapters import apply_adapter
from finetune.adapters.export import export_final, merge_to_folder
from finetune.errors import ConfigError, DiskFullError


@pytest.fixture
def adapter_run(tmp_path: Path, tiny_model_dir: Path, load_base, peft_cfg):
    """(model, tokenizer, run_dir): a LoRA model and a run directory holding its final/."""
    from transformers import AutoTokenizer

    model = apply_adapter(load_base(), peft_cfg(method="lora", r=4, alpha=8))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"model:\n  name_or_path: {tiny_model_dir}\npeft:\n  method: lora\n", encoding="utf-8")
    return model, tokenizer, run_dir


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder: Path) -> set[str]:
    return {oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir() if p.is_file()}


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_final_and_a_merge_are_readable_by_others(adapter_run, tmp_path: Path,
                                                  umask_022) -> None:
    model, tokenizer, run_dir = adapter_run
    final = export_final(model, tokenizer, run_dir)
    assert oct(stat.S_IMODE(final.stat().st_mode)) == "0o755"
    assert _modes(final) == {"0o644"}
    merged = merge_to_folder(run_dir, tmp_path / "merged")
    assert oct(stat.S_IMODE(merged.stat().st_mode)) == "0o755"
    assert _modes(merged) == {"0o644"}


def test_a_full_disk_during_final_is_one_paragraph_and_keeps_the_earlier_final(
        adapter_run, monkeypatch) -> None:
    model, tokenizer, run_dir = adapter_run
    earlier = export_final(model, tokenizer, run_dir)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    monkeypatch.setattr(tokenizer, "save_pretrained", _disk_full)
    with pytest.raises(DiskFullError) as info:
        export_final(model, tokenizer, run_dir)
    message = str(info.value)
    assert info.value.exit_code == 1
    assert f"write final/ in {run_dir}" in message and "MB are free" in message
    assert "resume=auto" in message and "\n" not in message
    assert not list(run_dir.glob(".final-*"))
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


@pytest.mark.parametrize("out", ["/proc/merged", "/proc/finetune/deeper/merged"])
def test_merge_into_a_place_that_cannot_be_written_exits_2(adapter_run, out: str) -> None:
    model, tokenizer, run_dir = adapter_run
    export_final(model, tokenizer, run_dir)
    with pytest.raises(ConfigError) as info:
        merge_to_folder(run_dir, out)
    assert info.value.exit_code == 2
    assert f"cannot write the merged model to {out}" in str(info.value)
    assert not Path(out).exists() and not Path("/proc/finetune").exists()


def test_a_full_disk_during_a_merge_leaves_nothing(adapter_run, tmp_path: Path,
                                                   monkeypatch) -> None:
    from transformers import PreTrainedTokenizerBase

    model, tokenizer, run_dir = adapter_run
    export_final(model, tokenizer, run_dir)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", _disk_full)
    out = tmp_path / "new" / "deeper" / "merged"
    with pytest.raises(DiskFullError, match="not enough disk space to write the merged model"):
        merge_to_folder(run_dir, out)
    assert not (tmp_path / "new").exists()
