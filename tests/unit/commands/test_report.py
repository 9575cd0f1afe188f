"""`finetune report`: two run directories made by hand, compared as a table, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.cli import dispatch
from finetune.errors import ConfigError


def _run_dir(root: Path, name: str, *, lr: float, r: int, losses: list[float],
             evals: dict[int, float], tokens_per_s: float, mfu: float | None, peak: float,
             finished: bool = True) -> Path:
    run = root / name
    run.mkdir()
    config = {"recipe": "lora_sft", "output_dir": str(run), "seed": 42,
              "optim": {"lr": lr, "scheduler": "cosine"}, "peft": {"r": r, "method": "lora"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step, loss in enumerate(losses, start=1):
        rows.append({"step": step, "loss": loss, "lr": lr, "tokens": int(tokens_per_s),
                     "step_time_s": 1.0, "tokens_per_s": tokens_per_s, "mfu": mfu,
                     "peak_mem_gb": peak - 0.1 * (len(losses) - step)})
        if step in evals:
            rows.append({"step": step, "eval_loss": evals[step]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run / "summary.json").write_text(json.dumps(
            {"steps": len(losses), "last_loss": losses[-1], "eval_loss": list(evals.values())[-1],
             "peak_memory_gb": peak}))
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a = _run_dir(tmp_path, "lr1e-3", lr=1e-3, r=16, losses=[3.0, 2.5, 2.0, 1.8],
                 evals={2: 2.4, 4: 2.2}, tokens_per_s=1000.0, mfu=0.3, peak=4.0)
    b = _run_dir(tmp_path, "lr2e-3", lr=2e-3, r=16, losses=[3.0, 2.2, 1.9, 1.7],
                 evals={2: 2.1, 4: 2.3}, tokens_per_s=1500.0, mfu=None, peak=5.5,
                 finished=False)
    return a, b


def test_json_holds_differences_and_figures(two_runs, capsys: pytest.CaptureFixture) -> None:
    a, b = two_runs
    assert dispatch(["report", str(a), str(b), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config_differences"] == ["optim.lr"]  # output_dir differs but says nothing
    first, second = data["runs"]
    assert first == {"run": "lr1e-3", "path": str(a), "config": {"optim.lr": 1e-3}, "steps": 4,
                     "final_loss": 1.8, "final_eval_loss": 2.2, "best_eval_loss": 2.2,
                     "best_eval_step": 4, "tokens_per_s": 1000.0, "mfu": pytest.approx(0.3),
                     "peak_memory_gb": 4.0, "completed": True}
    # Not finished: figures from metrics.jsonl (final loss: the last tenth, at least one step).
    assert second["completed"] is False and second["final_loss"] == 1.7
    assert (second["best_eval_loss"], second["best_eval_step"]) == (2.1, 2)
    assert second["final_eval_loss"] == 2.3 and second["mfu"] is None
    assert second["peak_memory_gb"] == pytest.approx(5.5)


def test_table_shows_one_row_per_run(two_runs, capsys: pytest.CaptureFixture) -> None:
    a, b = two_runs
    assert dispatch(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "final loss" in line)
    assert [cell.strip() for cell in header.strip("┃│ ").split("┃")] == [
        "run", "optim.lr", "steps", "final loss", "final eval", "best eval", "tokens/s", "MFU",
        "peak mem (GiB)"]
    row_a = next(line for line in out.splitlines() if "lr1e-3" in line)
    cells = [cell.strip() for cell in row_a.strip("│ ").split("│")]
    assert cells == ["lr1e-3", "0.001", "4", "1.8000", "2.2000", "2.2000 @4", "1,000", "30.0%",
                     "4.00"]
    row_b = next(line for line in out.splitlines() if "lr2e-3" in line)
    assert "(not finished)" in row_b and "1,500" in row_b and " - " in row_b


def test_plot_overlays_the_runs(two_runs, tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))
    out = tmp_path / "losses.png"
    assert dispatch(["report", *map(str, two_runs), "--plot", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    labels = [t.get_text() for t in kept[0].axes[0].get_legend().get_texts()]
    assert labels == ["lr1e-3 (optim.lr=0.001) train", "lr1e-3 (optim.lr=0.001) eval",
                      "lr2e-3 (optim.lr=0.002) train", "lr2e-3 (optim.lr=0.002) eval"]
    assert f"loss curves written to {out}" in capsys.readouterr().out


def test_a_single_run_has_no_differences(two_runs, capsys: pytest.CaptureFixture) -> None:
    assert dispatch(["report", str(two_runs[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config_differences"] == []


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run directory") as info:
        dispatch(["report", str(tmp_path)])
    assert info.value.exit_code == 2


def test_many_differences_share_one_column(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    runs = []
    for i in (1, 2):
        run = _run_dir(tmp_path, f"r{i}", lr=i * 1e-3, r=8 * i, losses=[3.0, 2.0], evals={2: 2.5},
                       tokens_per_s=100.0, mfu=None, peak=1.0)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.update({"seed": i, "trainer": {"max_steps": 10 * i, "micro_batch_size": i}})
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        runs.append(str(run))
    assert dispatch(["report", *runs]) == 0
    out = capsys.readouterr().out
    assert "config differences" in out and "optim.lr" not in out.splitlines()[1]
    for line in ("optim.lr=0.001", "peft.r=8", "seed=1", "trainer.max_steps=10",
                 "trainer.micro_batch_size=1", "optim.lr=0.002", "trainer.max_steps=20"):
        assert line in out, line
