"""report.png and the overlay plot: the panels, their labels and units, drawn from records."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.metrics import report
from finetune.metrics.report import plot_losses, plot_run, smooth


def _records(steps: int = 60, mfu: bool = True) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": 3.0 - step / 40, "lr": 1e-4, "tokens_per_s": 900.0,
                     "mfu": 0.3 if mfu else None, "peak_mem_gb": 2.0, "step_time_s": 1.0,
                     "tokens": 900})
        if step % 20 == 0:
            rows.append({"step": step, "eval_loss": 3.1 - step / 40})
    return rows


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures drawn, kept open for inspection (plot_* close them when done)."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig: kept.append(fig))
    return kept


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_report_has_four_labelled_panels(tmp_path: Path, figures: list) -> None:
    path = plot_run(_records(), tmp_path / "report.png", title="lora_sft: run",
                    memory_source="device memory allocated")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = _axes_by_title(figures[0])
    assert set(axes) == {"loss", "learning rate", "throughput and MFU",
                         "memory: peak so far (device memory allocated)"}
    assert axes["loss"].get_ylabel() == "loss (nats / trained token)"
    assert axes["learning rate"].get_ylabel() == "learning rate"
    assert axes["throughput and MFU"].get_ylabel() == "tokens / s (input tokens)"
    assert "MFU (%), dashed" in [ax.get_ylabel() for ax in figures[0].axes]
    assert axes["memory: peak so far (device memory allocated)"].get_ylabel() == \
        "peak memory (GiB)"
    assert all(ax.get_xlabel() == "optimizer step" for ax in axes.values())
    legend = [t.get_text() for t in axes["loss"].get_legend().get_texts()]
    assert legend == ["train (per step)", "train (smoothed)", "eval"]
    eval_line = axes["loss"].get_lines()[-1]
    assert list(eval_line.get_xdata()) == [20, 40, 60]
    assert figures[0].texts[0].get_text() == "lora_sft: run"  # the suptitle


def test_report_says_when_mfu_is_unknown(tmp_path: Path, figures: list) -> None:
    plot_run(_records(5, mfu=False), tmp_path / "report.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert "throughput (MFU unknown: no peak FLOP/s for this device and precision)" in titles
    assert len(figures[0].axes) == 4  # no empty MFU axis
    loss = _axes_by_title(figures[0])["loss"]  # 5 steps: drawn as they are, no smoothing
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train"]


def test_report_of_an_empty_run_still_draws(tmp_path: Path, figures: list) -> None:
    plot_run([], tmp_path / "report.png")
    loss = _axes_by_title(figures[0])["loss"]
    assert "no steps recorded" in [t.get_text() for t in loss.texts]


def test_overlay_has_one_curve_per_run(tmp_path: Path, figures: list) -> None:
    plot_losses([("a (optim.lr=0.001)", _records(10)), ("b (optim.lr=0.002)", _records(10))],
                tmp_path / "losses.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a (optim.lr=0.001) train", "b (optim.lr=0.002) train"]
    assert ax.get_ylabel() == "loss (nats / trained token)" and ax.get_xlabel() == "optimizer step"
    assert (tmp_path / "losses.png").stat().st_size > 0


def test_smoothing_follows_the_trend_without_lag_at_the_start() -> None:
    assert smooth([]) == []
    assert smooth([5.0, 5.0, 5.0]) == [5.0, 5.0, 5.0]
    noisy = [1.0, 3.0] * 50
    smoothed = smooth(noisy)
    assert smoothed[0] == 1.0 and abs(smoothed[-1] - 2.0) < 0.3
    assert report.SMOOTH_FROM > 5
