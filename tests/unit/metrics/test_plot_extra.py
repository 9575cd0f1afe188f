"""matplotlib is the [plot] extra: where it is missing, a run ends without report.png and says
so in one line naming the install, `finetune report --plot` is refused with exit code 2 naming
it, and `finetune env` lists it as not installed."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import ConfigError
from tests.unit.metrics.conftest import FakeAccelerator

STEPS = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens": 10, "step_time_s": 1.0,
          "tokens_per_s": 10.0, "mfu": None, "peak_mem_gb": 1.0} for s in (1, 2, 3)]
INSTALL = "pip install 'finetune[plot]'"


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment without the [plot] extra: `import matplotlib` raises ImportError."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _finished_run(tmp_path: Path) -> tuple[Path, io.StringIO]:
    """A monitor's end-of-run report (three logged steps) on rank 0; the run folder and its
    console."""
    from finetune.config.compose import compose_run_config
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware.simulated import profile_by_name
    from finetune.kernels import plan
    from finetune.metrics.display import make_console
    from finetune.metrics.monitor import RunMonitor

    cfg = compose_run_config("lora_sft", ["logger.display=plain"])
    stream = io.StringIO()
    monitor = RunMonitor(cfg, tmp_path, FakeAccelerator(), plan(profile_by_name("cpu", "all"),
                                                                KernelsConfig()),
                         console=make_console(stream))
    for record in STEPS:
        monitor.metrics.write(record)
    report = monitor.write_report()  # what finish() draws before the summary
    monitor.close()
    assert report in (None, tmp_path / "report.png")
    return tmp_path, stream


def test_a_run_without_matplotlib_says_once_that_it_draws_no_report(
        tmp_path: Path, no_matplotlib) -> None:
    run_dir, stream = _finished_run(tmp_path)
    assert not (run_dir / "report.png").exists()
    lines = [line for line in stream.getvalue().splitlines() if "report.png" in line]
    assert lines == [f"report.png not drawn: matplotlib is not installed; `{INSTALL}` draws it "
                     f"(the figures are in {run_dir / 'metrics.jsonl'})"]


def test_a_run_with_matplotlib_draws_its_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run_dir, stream = _finished_run(tmp_path)
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "not drawn" not in stream.getvalue()


def test_report_plot_without_matplotlib_names_the_extra(tmp_path: Path, no_matplotlib) -> None:
    from finetune.cli import dispatch

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"recipe": "lora_sft",
                                                     "output_dir": str(run)}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STEPS))
    with pytest.raises(ConfigError, match=r"needs matplotlib.*pip install 'finetune\[plot\]'") \
            as info:
        dispatch(["report", str(run), "--plot", str(tmp_path / "loss.png")])
    assert info.value.exit_code == 2
    assert not (tmp_path / "loss.png").exists()


def test_env_lists_the_plot_extra(monkeypatch: pytest.MonkeyPatch, no_matplotlib) -> None:
    from finetune.dependencies import optional_extra_lines

    lines = optional_extra_lines()
    assert lines[0] == "optional extras (pip install 'finetune[NAME]'):"
    plot = next(line for line in lines if line.split()[0] == "plot")
    assert plot.split()[1:3] == ["not", "installed"] and "finetune report --plot" in plot
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    plot = next(line for line in optional_extra_lines() if line.split()[0] == "plot")
    assert plot.split()[1] == "installed"
