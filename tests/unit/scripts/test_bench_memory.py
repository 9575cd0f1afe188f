"""scripts/bench_memory.py's pure parts, in this process: arguments, the Llama-3-vocabulary
workload and its checkpointing setting on every side, the figures of a cell, the JSON line, the
targets and the doc section. No side is launched (that takes minutes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_memory  # noqa: E402
import bench_report as report  # noqa: E402
import bench_trl  # noqa: E402
import bench_workload as workload  # noqa: E402


def test_defaults_measure_2048_and_512_token_rows_with_checkpointing_off_and_on() -> None:
    args = bench_memory.parse_args([])
    assert (args.seq_lens, args.checkpointing, args.repeats) == ([2048, 512], "both", 1)
    assert args.doc == bench_memory.DOC and not args.no_doc
    assert bench_memory.parse_args(["--smoke"]).seq_lens == [64]
    assert bench_memory.parse_args(["--seq-lens", "1024,256"]).seq_lens == [1024, 256]
    for bad in ("", "abc", "8"):
        with pytest.raises(SystemExit):
            bench_memory.parse_args(["--seq-lens", bad])
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--repeats", "0"])


def test_the_model_has_llama3s_vocabulary_and_every_side_gets_the_checkpointing(
        tmp_path: Path) -> None:
    from finetune.config.compose import compose_run_config

    settings = bench_memory.settings_for(bench_memory.parse_args(["--steps", "5"]), 2048)
    assert (settings.size, settings.max_seq_len, settings.steps) == ("llama3_head", 2048, 5)
    config = workload.model_config(settings.size)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (128256, 256, 2)
    for on in (False, True):
        chosen = bench_memory.replace(settings, gradient_checkpointing=on)
        overrides = workload.ours_overrides(chosen, model_dir=tmp_path, data_path=tmp_path,
                                            packing=True, cache_dir=tmp_path)
        assert compose_run_config("lora_sft", overrides).trainer.gradient_checkpointing is on
        trl = bench_trl.sft_config_kwargs(chosen.to_json(), {"precision": "fp32"}, packing=True,
                                          output_dir=tmp_path, use_cpu=True)
        assert trl["gradient_checkpointing"] is on


def _result(who: str, peak: float, tokens_per_s: float, losses: list[float]) -> report.RunResult:
    return report.RunResult(side=(who, "packed"), tokens_per_s=tokens_per_s, startup_s=1.0,
                            peak_rss_mb=peak, step_tokens=[100] * len(losses), losses=losses)


def _cells() -> tuple[dict, dict]:
    def cell(scale: float) -> dict:
        results = [_result("ours", 1000 * scale, 600, [3.0, 2.0, 1.0]),
                   _result("reference", 1500 * scale, 650, [3.0, 2.0, 1.0]),
                   _result("trl", 3000 * scale, 200, [3.1, 2.1, 1.1])]
        return bench_memory.figures(results, [_result("ours", 2800 * scale, 500, [3, 2, 1])],
                                    "cpu")

    cells = {2048: {"off": cell(1.0), "on": cell(0.8)}, 512: {"off": cell(0.5), "on": cell(0.4)}}
    return cells, {2048: 2000.0, 512: 1000.0}


def test_the_json_line_has_each_setting_and_the_loss_head_saving() -> None:
    cells, head = _cells()
    line = bench_memory.json_line(cells, head)
    assert line["seq_len"] == 2048 and list(line["by_seq_len"]) == ["512"]
    for setting in ("off", "on"):
        assert {"peak_mb", "trl_peak_mb", "reference_peak_mb", "tokens_per_s",
                "trl_tokens_per_s"} <= set(line[setting])
    assert line["off"]["peak_mb"] == 1000 and line["off"]["trl_peak_mb"] == 3000
    assert line["on"]["reference_peak_mb"] == 1200
    assert line["off"]["peak_vs_trl"] == pytest.approx(1 / 3, abs=1e-3)
    assert line["off"]["tokens_per_s_vs_trl"] == 3.0
    # The unchunked run's peak minus finetune's, checkpointing off; its share of the head.
    assert line["loss_head_mb_saved"] == 1800 and line["loss_head_fall"] == 0.9
    assert line["by_seq_len"]["512"]["loss_head_mb_saved"] == 900
    assert json.loads(json.dumps(line)) == line  # one JSON line
    verdicts = [t.line().split()[0] for t in bench_memory.targets(line)]
    assert verdicts == ["PASS"] * 5
    # Without TRL its keys are null and its targets neither pass nor miss.
    no_trl = {n: {s: {**c, "trl": None} for s, c in by.items()} for n, by in cells.items()}
    line = bench_memory.json_line(no_trl, head)
    assert line["off"]["trl_peak_mb"] is None and line["off"]["peak_vs_trl"] is None
    assert bench_memory.targets(line)[0].line().startswith("SKIP")


def test_the_losses_are_compared_at_equal_tokens_and_the_unchunked_run_is_apart() -> None:
    cells, _ = _cells()
    off = cells[2048]["off"]
    assert off["ours"]["loss"] == pytest.approx(1.5)  # steps ending in (150, 300] tokens
    assert off["trl"]["loss"] == pytest.approx(1.6)
    assert off["unchunked"] == {"peak_mb": 2800}


def test_the_head_memory_is_three_fp32_vocabulary_rows_per_trained_position() -> None:
    stats = [{"trained": 100}, {"trained": 1895}, {"trained": 7}]
    assert bench_memory.head_mb(stats, 128256) == pytest.approx(3 * 1895 * 128256 * 4 / 2**20)


def test_the_doc_section_is_written_once_and_replaced_in_place(tmp_path: Path) -> None:
    cells, head = _cells()
    line = bench_memory.json_line(cells, head)
    plan = {"hardware": {"name": "Test CPU"}, "device": "cpu", "precision": "fp32",
            "attention": "sdpa", "optimizer": "adamw"}
    section = bench_memory.doc_section(["--seq-lens", "2048,512"], cells, line,
                                       bench_memory.targets(line), ["TRL is not installed"],
                                       plan, (9.0, 8.0))
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nother text\n")
    for _ in range(2):
        doc.write_text(report.replace_section(doc.read_text(), "memory", section))
    text = doc.read_text()
    assert text.count("<!-- bench:memory -->") == 1 and "other text" in text
    assert "`python scripts/bench_memory.py --seq-lens 2048,512`" in text
    assert "| 2048 | off | finetune | 1,000 | 600 | 1.5000 |" in text
    assert "| 2048 | off | finetune, unchunked loss head | 2,800 |  |  |" in text
    assert "- TRL is not installed" in text and "shared with other jobs" in text
    assert json.dumps(line) in text


def test_a_missing_trl_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_memory.importlib.util, "find_spec", lambda name: None)
    assert "TRL is not installed" in bench_memory.trl_missing()


def _kept_run(folder: Path, name: str, who: str, peak: float, *, finished: bool = True) -> None:
    run_dir = folder / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text(json.dumps(
        {"side": [who, "packed"], "rep": 0, "launched_unix": 0.0, "peak_rss_mb": peak}))
    if finished:
        (run_dir / "result.json").write_text(json.dumps(
            {"step_ends": [1.0, 2.0, 3.0], "losses": [3.0, 2.0, 1.0], "step_tokens": [10] * 3,
             "first_step_end_unix": 1.0}))


def test_summarize_reads_the_finished_runs_of_a_kept_workdir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = workload.Settings(size="small", max_seq_len=64, micro_batch_size=1, steps=3,
                                 timing_warmup=1, rows=10)
    folder = tmp_path / "seq64"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps(settings.to_json()))
    step = {"real": 10, "trained": 5, "rows": 1, "width": 10}
    (folder / "prepared.json").write_text(json.dumps({"stats": {"packed": [step] * 3}}))
    plan = {"device": "cpu", "hardware": {"name": "Test CPU"}, "precision": "fp32",
            "attention": "sdpa", "optimizer": "adamw"}
    (folder / "plan.json").write_text(json.dumps({"packed": plan}))
    _kept_run(folder, "ours-off-0", "ours", 100.0)
    _kept_run(folder, "reference-off-again-0", "reference", 150.0)
    _kept_run(folder, "trl-off-0", "trl", 400.0)
    _kept_run(folder, "ours-unchunked-0", "ours", 300.0)
    _kept_run(folder, "ours-on-0", "ours", 90.0, finished=False)  # stopped: left out
    cells, head, _ = bench_memory.read_kept(tmp_path)
    assert list(cells) == [64] and list(cells[64]) == ["off"]
    off = cells[64]["off"]
    assert (off["ours"]["peak_mb"], off["reference"]["peak_mb"], off["trl"]["peak_mb"],
            off["unchunked"]["peak_mb"]) == (100.0, 150.0, 400.0, 300.0)
    doc = tmp_path / "doc.md"
    assert bench_memory.main(["--summarize", str(tmp_path), "--doc", str(doc)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loss_head_mb_saved"] == 200.0 and line["off"]["peak_vs_trl"] == 0.25
    assert "on" not in line and "| 64 | off | TRL SFTTrainer | 400 |" in doc.read_text()
