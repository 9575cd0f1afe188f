"""`finetune report --plot`: it says the path it really wrote, never replaces an existing file
(a run's own report.png included) without --force, and refuses a format or a place it cannot
write with one paragraph (exit code 2), leaving nothing behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from finetune.cli import dispatch
from finetune.errors import ConfigError, DiskFullError


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "lora_sft",
                                                     "output_dir": str(run)}))
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens": 10, "step_time_s": 1.0,
             "tokens_per_s": 10.0, "mfu": None, "peak_mem_gb": 1.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "report.png").write_bytes(b"the run's own report")
    return run


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:4] == b"\x89PNG"


def test_the_message_names_the_file_really_written(run: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "plots"
    folder.mkdir()
    assert dispatch(["report", str(run), "--plot", str(folder)]) == 0
    assert _is_png(folder / "loss_curves.png")
    assert f"loss curves written to {folder / 'loss_curves.png'}" in capsys.readouterr().out
    assert dispatch(["report", str(run), "--plot", str(tmp_path / "curves")]) == 0
    assert _is_png(tmp_path / "curves.png") and not (tmp_path / "curves").exists()
    assert f"loss curves written to {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_an_existing_file_is_replaced_only_with_force(run: Path, umask_022) -> None:
    own = run / "report.png"
    with pytest.raises(ConfigError, match="already exists, a file of run") as info:
        dispatch(["report", str(run), "--plot", str(own)])
    assert info.value.exit_code == 2 and "--force" in str(info.value)
    assert own.read_bytes() == b"the run's own report"
    assert dispatch(["report", str(run), "--plot", str(own), "--force"]) == 0
    assert _is_png(own) and oct(stat.S_IMODE(own.stat().st_mode)) == "0o644"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl",
                                                     "report.png"]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize(("plot", "says"), [
    ("curves.txt", "cannot be written as .txt"),
    ("missing/curves.png", "does not exist"),
])
def test_a_plot_that_cannot_be_written_exits_2_and_writes_nothing(
        run: Path, tmp_path: Path, plot: str, says: str) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=says) as info:
        dispatch(["report", str(run), "--plot", str(tmp_path / plot)])
    assert info.value.exit_code == 2
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unwritable_folder_exits_2(run: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write the plot to /proc/curves.png") as info:
        dispatch(["report", str(run), "--plot", "/proc/curves.png"])
    assert info.value.exit_code == 2


def test_a_full_disk_leaves_no_file(run: Path, tmp_path: Path, monkeypatch) -> None:
    from finetune.metrics import report

    def full(_runs, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot_losses", full)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DiskFullError, match="not enough disk space to write the plot"):
        dispatch(["report", str(run), "--plot", str(tmp_path / "curves.png")])
    assert sorted(tmp_path.rglob("*")) == before
