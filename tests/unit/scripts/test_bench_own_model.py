"""scripts/bench.py on the user's own model folder (`--model DIR`) and data (`--data FILE`): the
options, the data read in any supervised format and written as chat rows, the parameter count
and chat template read from the folder, TRL's refusal, and the doc section of such a run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402
import bench_report as report  # noqa: E402
import bench_workload as workload  # noqa: E402

ALPACA = [{"instruction": "Name a fruit.", "output": "An apple."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "No answer here."}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_model_and_data_go_into_the_settings_and_keep_the_repo_doc(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "mine.jsonl", ALPACA)
    args = bench.parse_args(["--quick", "--model", str(tiny_model_dir), "--data", str(data)])
    settings = bench.settings_from_args(args)
    assert settings.model == str(tiny_model_dir.resolve()) and settings.data == str(data)
    assert settings.steps == bench.PRESETS["quick"].steps  # the preset still sets the run
    assert workload.Settings.from_json(settings.to_json()) == settings
    assert args.no_doc  # your figures are not written into this repo's docs/benchmarks.md
    own_doc = bench.parse_args(["--model", str(tiny_model_dir), "--doc", str(tmp_path / "b.md")])
    assert not own_doc.no_doc and own_doc.doc == tmp_path / "b.md"
    assert bench.parse_args([]).doc == bench.DOC and not bench.parse_args([]).no_doc
    assert bench.settings_from_args(bench.parse_args([])).model is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpu", "--model", "{model}"], "--gpu builds its own"),
    (["--model", "{tmp}"], "not a model folder (no config.json there)"),
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
])
def test_bad_model_or_data_options_exit_2(capsys, tiny_model_dir: Path, tmp_path: Path,
                                          argv: list[str], message: str) -> None:
    argv = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_data_in_any_supervised_format_becomes_chat_rows(tmp_path: Path) -> None:
    rows = workload.chat_rows(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA))
    assert rows == [  # the row without an answer is skipped, as finetune skips it
        {"messages": [{"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "An apple."}]},
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]}]
    chat = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]}]
    assert workload.chat_rows(write_jsonl(tmp_path / "chat.jsonl", chat)) == chat


@pytest.mark.parametrize(("text", "message"), [
    ('{"instruction": "x"\n', "cannot read it as JSON lines"),
    ('{"text": "a document"}\n', "plain text documents"),
    ('{"question": "x"}\n', "cannot tell the data format"),
    ('{"instruction": "no answer", "output": null}\n', "no row finetune can train on"),
])
def test_unusable_data_is_refused_with_the_reason(tmp_path: Path, text: str,
                                                  message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(workload.WorkloadError, match=message) as error:
        workload.chat_rows(path)
    assert str(path) in str(error.value)


def test_parameters_and_chat_template_are_read_from_the_folder(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert workload.weight_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())
    assert "{% generation %}" in workload.chat_template_text(tiny_model_dir)


def test_trl_is_refused_for_a_template_without_generation_markers(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain-template"
    shutil.copytree(tiny_model_dir, plain)
    template = plain / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("{% generation %}", "")
                        .replace("{% endgeneration %}", ""), encoding="utf-8")
    refusal = bench.trl_refusal(bench.parse_args(["--model", str(plain)]))
    assert refusal and "no {% generation %} markers" in refusal and "--no-trl" in refusal
    assert bench.trl_refusal(bench.parse_args(["--model", str(plain), "--no-trl"])) is None
    assert bench.trl_refusal(bench.parse_args(["--model", str(plain),
                                               "--sides", "ours:packed"])) is None


def test_the_doc_section_names_your_model_and_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "my data.jsonl", ALPACA)
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(data), "--no-trl"]
    args = bench.parse_args(argv)
    side = report.RunResult(side=("ours", "packed"), tokens_per_s=100.0, startup_s=1.0,
                            peak_rss_mb=500.0, step_tokens=[10] * 8, losses=[1.0] * 8,
                            cpu_s_per_ktok=1.0, fill=1.0, rep=0, clock={}, run_dir=tmp_path)
    summary = report.summarize([side])
    plan = {"precision": "fp32", "base_dtype": "fp32", "autocast": False,
            "attention": "sdpa_varlen", "optimizer": "adamw_fused"}
    lengths = {"median": 20.0, "p90": 30.0, "p99": 31.0, "max": 32, "rows": 2,
               "parameters": 6_900_000}
    label, text = bench.doc_section(args, argv, bench.settings_from_args(args), summary, [],
                                    lengths, plan, (1.0, 1.0))
    name = tiny_model_dir.name
    assert label == f"quick-fp32-{name}-my_data.jsonl"
    assert f"### quick: {name}, fp32" in text
    assert f"Workload: {name} (6.9M parameters)" in text and "2 rows of my data.jsonl" in text
    assert "random init" not in text
