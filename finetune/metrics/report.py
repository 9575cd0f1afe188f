"""Figures of runs, drawn with matplotlib's Agg backend (no display needed); matplotlib comes
with the [plot] extra (`plotting_available`, `PLOT_INSTALL`).

`plot_run` draws OUTPUT_DIR/report.png at the end of a run: loss and eval loss, learning rate,
throughput and MFU, and memory, each against the optimizer step. `plot_losses` overlays the
loss curves of several runs for `finetune report --plot`. Noisy per-step curves are drawn faint
with a smoothed line on top, so the trend reads at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22"]


# matplotlib is the [plot] extra (about 25 MiB with its own dependencies, left out of an
# offline node's wheelhouse unless asked for).
PLOT_INSTALL = "pip install 'finetune[plot]'"


def plotting_available() -> bool:
    """Whether matplotlib imports here."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


SMOOTH_FROM = 40  # points: shorter curves are drawn as they are


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """An exponential moving average over about `span` points (default: a twentieth of the
    curve, at least 1), started on the first value so it has no warm-up bias toward 0."""
    if not values:
        return []
    span = span or max(1, len(values) // 20)
    alpha = 2 / (span + 1)
    out, current = [], values[0]
    for value in values:
        current = alpha * value + (1 - alpha) * current
        out.append(current)
    return out


def _series(records: list[dict[str, Any]], key: str, *, steps_only: bool = True,
            scale: float = 1.0) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r.get(key) is not None and (not steps_only or "loss" in r)]
    return [r["step"] for r in rows], [r[key] * scale for r in rows]


def _noisy(ax: Any, steps: list[int], values: list[float], color: str, label: str) -> None:
    """A per-step curve: as it is when short; faint, with its smoothed trend on top, when long."""
    if len(values) < SMOOTH_FROM:
        ax.plot(steps, values, color=color, linewidth=2, label=label)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1, label=f"{label} (per step)")
    ax.plot(steps, smooth(values), color=color, linewidth=2, label=f"{label} (smoothed)")


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4",
            fontsize=10, wrap=True)


def _loss_panel(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, losses = _series(records, "loss")
    if steps:
        _noisy(ax, steps, losses, _COLORS[0], "train")
    eval_steps, eval_losses = _series(records, "eval_loss", steps_only=False)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, color=_COLORS[1], marker="o", linewidth=1.5,
                label="eval")
        best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
        ax.annotate(f"best {eval_losses[best]:.3f}", (eval_steps[best], eval_losses[best]),
                    textcoords="offset points", xytext=(0, 8), ha="center", color=_COLORS[1])
    ax.set_title("loss")
    ax.set_ylabel("loss (nats / trained token)")
    if steps or eval_steps:
        ax.legend(loc="upper right", fontsize=8)
    else:
        _note(ax, "no steps recorded")


def _lr_panel(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, lrs = _series(records, "lr")
    ax.plot(steps, lrs, color=_COLORS[2], linewidth=2)
    ax.set_title("learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _throughput_panel(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, speed = _series(records, "tokens_per_s")
    _noisy(ax, steps, speed, _COLORS[3], "tokens/s")
    ax.set_title("throughput and MFU")
    ax.set_ylabel("tokens / s (input tokens)", color=_COLORS[3])
    ax.set_ylim(bottom=0)
    mfu_steps, mfu = _series(records, "mfu", scale=100.0)
    if not mfu_steps:
        ax.set_title("throughput (MFU unknown: no peak FLOP/s for this device and precision)",
                     fontsize=10)
        return
    right = ax.twinx()
    right.plot(mfu_steps, smooth(mfu) if len(mfu) >= SMOOTH_FROM else mfu, color=_COLORS[4],
               linewidth=2, linestyle="--")
    right.set_ylabel("MFU (%), dashed", color=_COLORS[4])
    right.set_ylim(bottom=0, top=max(max(mfu) * 1.15, 1.0))


def _memory_panel(ax: Any, records: list[dict[str, Any]], source: str) -> None:
    steps, memory = _series(records, "peak_mem_gb")
    ax.set_title(f"memory: peak so far ({source})")
    ax.set_ylabel("peak memory (GiB)")
    if steps:
        ax.plot(steps, memory, color=_COLORS[5], linewidth=2)
        ax.set_ylim(bottom=0, top=max(memory) * 1.15 or 1)
    else:
        _note(ax, "no memory figures in metrics.jsonl")


def plot_run(records: list[dict[str, Any]], path: Path, *, title: str = "",
             memory_source: str = "device memory allocated") -> Path:
    """Draw one run's report (four panels against the optimizer step) to `path` (PNG).
    `memory_source` says what peak_mem_gb measures (see finetune.metrics.memory)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), dpi=100, sharex=True)
    try:
        _loss_panel(axes[0][0], records)
        _lr_panel(axes[0][1], records)
        _throughput_panel(axes[1][0], records)
        _memory_panel(axes[1][1], records, memory_source)
        for ax in axes.flat:
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[1]:
            ax.set_xlabel("optimizer step")
        for ax in axes[0]:
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("optimizer step")
        if title:
            fig.suptitle(title, fontsize=13)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_losses(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Overlay the loss curves of several runs ((label, records) each) on one axis: the
    smoothed training loss as a line, eval loss as dashed markers of the same colour."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 6), dpi=100)
    try:
        for i, (label, records) in enumerate(runs):
            color = _COLORS[i % len(_COLORS)]
            steps, losses = _series(records, "loss")
            if steps:
                _noisy(ax, steps, losses, color, f"{label} train")
            eval_steps, eval_losses = _series(records, "eval_loss", steps_only=False)
            if eval_steps:
                ax.plot(eval_steps, eval_losses, color=color, linestyle="--", marker="o",
                        label=f"{label} eval")
        ax.set_title("loss by run")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / trained token)")
        ax.grid(True, alpha=0.3)
        # Beside the axes, so no curve is hidden behind it.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
