"""The step display of a run, on rank 0: live on a terminal, plain lines elsewhere.

`LiveDisplay` redraws one status block in place (progress bar, step/total, ETA; loss, lr, grad
norm, tokens/s, MFU, memory, data wait; the last and best eval loss) with rich, at most twice a
second from rich's refresh thread: a step only stores its record (no lock taken), so the loop
never waits on the terminal or on a redraw. While it is up, log records and prints appear above it, once: rich redirects
stdout/stderr, and the logging handlers that write to the terminal are pointed at the redirect.
`PlainDisplay` prints today's one-line format (`writers.ConsoleProgress`) every
`log_every_n_steps` steps, for CI, SLURM logs and pipes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from finetune.config.schema import DisplayMode
from finetune.metrics.writers import ConsoleProgress, format_duration

_active_live: list[LiveDisplay] = []  # at most one: rich allows a single live display


def live_display_active() -> bool:
    """Whether a LiveDisplay is drawing now (then other progress is shown as log lines)."""
    return bool(_active_live)


def plain(console: Console, text: str) -> None:
    """Print `text` as it is: no markup, highlighting or wrapping (logs keep whole lines)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def make_console(stream: TextIO | None = None, *, force_terminal: bool | None = None) -> Console:
    """A rich console on `stream` (stdout by default), wide enough for the kernel table when
    the output is not a terminal (rich would wrap it at 80 columns)."""
    console = Console(file=stream or sys.stdout, force_terminal=force_terminal,
                      highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(file=stream or sys.stdout, force_terminal=force_terminal,
                          highlight=False, width=200)
    return console


def wants_live(mode: DisplayMode | str, console: Console) -> bool:
    """`live` always, `plain` never, `auto` on a terminal that can move its cursor."""
    if mode == DisplayMode.live:
        return True
    if mode == DisplayMode.plain:
        return False
    return console.is_terminal and not console.is_dumb_terminal


class StepDisplay(Protocol):
    """What the monitor drives: `start` before the first step, `update` once per optimizer step
    with its record, `eval` with an eval record, `line` for a message, `close` at the end."""

    def start(self) -> None: ...
    def update(self, record: dict[str, Any]) -> None: ...
    def eval(self, record: dict[str, Any]) -> None: ...
    def line(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """Today's console lines: one per `log_every` steps (and the last), eval lines, messages."""

    def __init__(self, total_steps: int, log_every: int = 1, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.progress = ConsoleProgress(total_steps, stream)
        self.session_steps = 0

    def start(self) -> None:
        self.progress.start = time.monotonic()

    def update(self, record: dict[str, Any]) -> None:
        self.session_steps += 1
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            self.progress.step(record, self.session_steps)

    def eval(self, record: dict[str, Any]) -> None:
        self.line(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}")

    def line(self, text: str) -> None:
        self.progress.line(text)

    def close(self) -> None:
        """Nothing to take down: every line is already printed."""


def metrics_text(record: dict[str, Any] | None) -> Text:
    """The status line of a step record: loss, lr, grad norm, tokens/s, MFU, memory, and the
    share of the step spent waiting for data when it is noticeable (over 5%)."""
    if record is None:
        return Text("waiting for the first step...", style="dim")
    text = Text()

    def field(label: str, value: str, style: str = "bold") -> None:
        if text:
            text.append("  ")
        text.append(f"{label} ", style="dim")
        text.append(value, style=style)

    field("loss", f"{record['loss']:.4f}", "bold cyan")
    field("lr", f"{record['lr']:.2e}")
    field("grad norm", f"{record['grad_norm']:.3f}")
    field("tok/s", f"{record.get('tokens_per_s', 0):,.0f}")
    if record.get("mfu") is not None:
        field("MFU", f"{record['mfu']:.1%}")
    if record.get("peak_mem_gb") is not None:
        field("mem", f"{record['peak_mem_gb']:.2f} GiB")
    wait, step_time = record.get("data_wait_s"), record.get("step_time_s")
    if wait is not None and step_time and wait / step_time > 0.05:
        field("data wait", f"{wait / step_time:.0%}", "bold yellow")
    if record.get("skipped_non_finite"):
        field("skipped", "non-finite", "bold red")
    return text


class _Status:
    """The live block, rendered by rich's refresh thread from the display's latest state."""

    def __init__(self, display: LiveDisplay) -> None:
        self.display = display

    def __rich__(self) -> Group:
        d = self.display
        if d.record is not None:  # the progress task is updated here, off the training thread
            d.progress.update(d.task, completed=d.record["step"], eta=d.eta)
        lines: list[Any] = [d.progress, metrics_text(d.record)]
        if d.last_eval is not None:
            best_step, best = d.best_eval
            lines.append(Text.assemble(
                ("eval loss ", "dim"), (f"{d.last_eval[1]:.4f}", "bold green"),
                (f" at step {d.last_eval[0]}", "dim"), ("  best ", "dim"),
                (f"{best:.4f}", "bold green"), (f" at step {best_step}", "dim")))
        return Group(*lines)


class LiveDisplay:
    """A status block redrawn in place on a terminal (see the module docstring)."""

    def __init__(self, console: Console, total_steps: int, start_step: int = 0,
                 refresh_per_second: float = 2.0) -> None:
        self.console = console
        self.total_steps = total_steps
        self.start_step = start_step
        self.record: dict[str, Any] | None = None
        self.eta = "-:--:--"
        self.last_eval: tuple[int, float] | None = None
        self.best_eval: tuple[int, float] = (0, float("inf"))
        self.session_steps = 0
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(bar_width=None),
            TaskProgressColumn(), TextColumn("[dim]elapsed"), TimeElapsedColumn(),
            TextColumn("[dim]eta[/] {task.fields[eta]}"), console=console, expand=True)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           eta="-:--:--")
        self.live = Live(_Status(self), console=console, refresh_per_second=refresh_per_second,
                         transient=False)
        self._started = 0.0
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def start(self) -> None:
        if _active_live:
            raise RuntimeError("a live display is already active")
        self._started = time.monotonic()
        before = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
        self.live.start()
        _active_live.append(self)
        if id(sys.stderr) not in before:  # rich redirected the streams (a terminal)
            self._reroute_logging(before)

    def update(self, record: dict[str, Any]) -> None:
        """Store the step's record: no lock, no drawing (the refresh thread draws)."""
        self.session_steps += 1
        elapsed = time.monotonic() - self._started
        self.eta = format_duration(elapsed / self.session_steps
                                   * (self.total_steps - record["step"]))
        self.record = record

    def eval(self, record: dict[str, Any]) -> None:
        step, loss = record["step"], record["eval_loss"]
        self.last_eval = (step, loss)
        if loss < self.best_eval[1]:
            self.best_eval = (step, loss)
        self.line(f"eval at step {step}: loss {loss:.4f}")

    def line(self, text: str) -> None:
        plain(self.console, text)

    def close(self) -> None:
        if self not in _active_live:
            return
        self._restore_logging()
        self.live.refresh()
        self.live.stop()
        _active_live.remove(self)

    def _reroute_logging(self, terminal: set[int]) -> None:
        """Point handlers that wrote to the terminal streams at rich's redirected stderr, so a
        log record prints above the block instead of through it."""
        for name in (None, "finetune"):
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler and id(handler.stream) in terminal:
                    self._rerouted.append((handler, handler.setStream(sys.stderr)))

    def _restore_logging(self) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted.clear()


def make_display(mode: DisplayMode | str, *, total_steps: int, start_step: int = 0,
                 log_every: int = 1, console: Console | None = None) -> StepDisplay:
    """The step display for this output: live on a terminal (or when asked), else plain."""
    console = console or make_console()
    if wants_live(mode, console):
        return LiveDisplay(console, total_steps, start_step)
    return PlainDisplay(total_steps, log_every, console.file)
