"""The step display: plain lines off a terminal, a live block on one, and log records that show
once, above the block, while it is up."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from finetune.metrics import display as display_module
from finetune.metrics.display import (
    LiveDisplay,
    PlainDisplay,
    make_console,
    make_display,
    metrics_text,
    wants_live,
)

RECORD = {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1234.0,
          "step_time_s": 1.0, "data_wait_s": 0.0, "mfu": None, "peak_mem_gb": 1.5}


def _terminal() -> tuple:
    """A console that takes a StringIO for a terminal (no colours, so text reads plainly)."""
    from rich.console import Console

    stream = io.StringIO()
    return Console(file=stream, force_terminal=True, color_system=None, width=120), stream


def test_auto_is_live_only_on_a_terminal() -> None:
    pipe = make_console(io.StringIO())
    terminal, _ = _terminal()
    assert not wants_live("auto", pipe) and wants_live("auto", terminal)
    assert wants_live("live", pipe) and not wants_live("plain", terminal)
    assert isinstance(make_display("auto", total_steps=3, console=pipe), PlainDisplay)
    assert isinstance(make_display("auto", total_steps=3, console=terminal), LiveDisplay)


def test_a_pipe_gets_no_wrapped_lines() -> None:
    stream = io.StringIO()
    console = make_console(stream)
    display_module.plain(console, "x" * 300)
    assert stream.getvalue() == "x" * 300 + "\n"


def test_plain_lines_every_n_steps_and_the_last() -> None:
    stream = io.StringIO()
    plain = PlainDisplay(total_steps=5, log_every=2, stream=stream)
    plain.start()
    for step in range(1, 6):
        plain.update({**RECORD, "step": step})
    plain.eval({"step": 5, "eval_loss": 2.25})
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines[:3]] == ["step 2/5", "step 4/5", "step 5/5"]
    assert "mem 1.50 GiB" in lines[0] and "mfu" not in lines[0]
    assert lines[3] == "eval at step 5: loss 2.2500"


def test_status_line_shows_what_is_known() -> None:
    assert "MFU" not in metrics_text(RECORD).plain
    text = metrics_text({**RECORD, "mfu": 0.4123, "data_wait_s": 0.3}).plain
    assert "loss 2.5000" in text and "lr 1.00e-04" in text and "grad norm 0.500" in text
    assert "tok/s 1,234" in text and "MFU 41.2%" in text and "mem 1.50 GiB" in text
    assert "data wait 30%" in text
    assert "data wait" not in metrics_text({**RECORD, "data_wait_s": 0.04}).plain
    assert metrics_text(None).plain.startswith("waiting")


def test_live_block_shows_progress_metrics_and_evals() -> None:
    console, stream = _terminal()
    live = LiveDisplay(console, total_steps=10, start_step=4)
    live.start()
    try:
        live.update({**RECORD, "step": 5, "mfu": 0.25})
        live.eval({"step": 5, "eval_loss": 2.0})
        live.eval({"step": 6, "eval_loss": 2.1})
    finally:
        live.close()
    out = stream.getvalue()
    assert "step 5/10" in out and "MFU 25.0%" in out and "eta" in out
    assert "eval at step 5: loss 2.0000" in out
    assert "eval loss 2.1000 at step 6" in out and "best 2.0000 at step 5" in out
    assert not display_module.live_display_active()


def test_log_records_print_once_above_the_live_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler on the terminal's stderr (as the CLI sets up) is pointed at rich's redirect
    while the block is up: each record shows once, in the console's output, and the handler
    gets its stream back afterwards."""
    terminal_err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal_err)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("finetune")
    monkeypatch.setattr(log, "handlers", [handler])
    monkeypatch.setattr(log, "propagate", False)
    log.setLevel(logging.INFO)
    console, stream = _terminal()
    live = LiveDisplay(console, total_steps=3)
    live.start()
    try:
        live.update({**RECORD, "step": 1})
        logging.getLogger("finetune.data").warning("3 rows truncated")
        print("a library's print")
    finally:
        live.close()
    assert handler.stream is terminal_err
    assert stream.getvalue().count("WARNING 3 rows truncated") == 1
    assert stream.getvalue().count("a library's print") == 1
    assert terminal_err.getvalue() == ""  # nothing written through the block
    logging.getLogger("finetune.data").warning("after")
    assert terminal_err.getvalue() == "WARNING after\n"


def test_only_one_live_display_at_a_time() -> None:
    first = LiveDisplay(_terminal()[0], total_steps=2)
    first.start()
    try:
        with pytest.raises(RuntimeError):
            LiveDisplay(_terminal()[0], total_steps=2).start()
    finally:
        first.close()
    first.close()  # twice is fine
