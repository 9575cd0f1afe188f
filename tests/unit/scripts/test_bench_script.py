"""scripts/bench.py's pure parts, in this process: arguments and presets, the workload (model
config, data, finetune overrides), the one token-counting rule, tokens/s, the loss at equal
tokens, ratios, targets, the JSON line, the doc section, and --gpu's variants and refusal."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402
import bench_gpu  # noqa: E402
import bench_report as report  # noqa: E402
import bench_runner as runner  # noqa: E402
import bench_workload as workload  # noqa: E402

from finetune.data.collate import Collator  # noqa: E402
from finetune.train.loss import trained_tokens as finetune_trained_tokens  # noqa: E402

# ---------------------------------------------------------------- arguments


def test_defaults_are_the_medium_preset_with_three_repeats() -> None:
    args = bench.parse_args([])
    settings = bench.settings_from_args(args)
    assert (args.repeats, args.omp_wait_policy, args.precision) == (3, "passive", "plan")
    assert settings == bench.PRESETS["medium"]
    assert bench.sides_for(args) == bench.ALL_SIDES


def test_quick_is_small_without_the_unpacked_reference() -> None:
    args = bench.parse_args(["--quick"])
    assert bench.settings_from_args(args).size == "small"
    assert ("reference", "unpacked") not in bench.sides_for(args)
    assert len(bench.sides_for(args)) == 5


def test_explicit_options_override_the_preset() -> None:
    args = bench.parse_args(["--size", "small", "--steps", "20", "--warmup", "4", "--seq-len",
                             "128", "--batch", "2", "--lr", "0.001", "--precision", "fp32"])
    settings = bench.settings_from_args(args)
    assert (settings.steps, settings.timing_warmup, settings.max_seq_len) == (20, 4, 128)
    assert (settings.micro_batch_size, settings.lr, settings.precision) == (2, 0.001, "fp32")
    assert settings.rows == bench.PRESETS["small"].rows


def test_sides_option_and_no_trl() -> None:
    args = bench.parse_args(["--sides", "ours:packed,trl:packed", "--no-trl"])
    assert bench.sides_for(args) == [("ours", "packed")]
    with pytest.raises(SystemExit):
        bench.parse_args(["--sides", "ours:sideways"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])


def test_gpu_preset_is_llama3_8b_packed_2048() -> None:
    settings = bench.settings_from_args(bench.parse_args(["--gpu", "--steps", "6"]))
    assert (settings.size, settings.max_seq_len, settings.lora_r, settings.steps) == (
        "llama3_8b", 2048, 16, 6)


def test_run_order_interleaves_and_rotates() -> None:
    sides = [("a", "x"), ("b", "x"), ("c", "x")]
    order = runner.run_order(sides, 3)
    assert [rep for rep, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for rep in range(3):
        assert sorted(side for r, side in order if r == rep) == sorted(sides)
    assert [order[0][1], order[3][1], order[6][1]] == sides  # each side leads once


def test_side_environment_sets_the_wait_policy_for_every_side() -> None:
    env = runner.side_environment({"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"}, "passive")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["HF_HUB_OFFLINE"] == "1"
    assert runner.side_environment({"OMP_WAIT_POLICY": "ACTIVE"}, "inherit")[
        "OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("changes", [{"size": "huge"}, {"precision": "fp8"},
                                     {"timing_warmup": 0}, {"steps": 4, "timing_warmup": 3},
                                     {"rows": 0}])
def test_settings_reject_bad_values(changes: dict) -> None:
    with pytest.raises(ValueError):
        workload.Settings(**changes)


def test_settings_round_trip_through_json() -> None:
    settings = bench.PRESETS["quick"]
    assert workload.Settings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


# ---------------------------------------------------------------- the workload


def test_overrides_compose_into_finetune_config(tmp_path: Path) -> None:
    from finetune.config.compose import compose_run_config

    settings = workload.Settings(size="small", max_seq_len=128, micro_batch_size=2, steps=5,
                                 timing_warmup=1, lr=1e-3, lora_r=8, lora_alpha=16,
                                 precision="fp32")
    overrides = workload.ours_overrides(settings, model_dir=tmp_path / "model",
                                        data_path=tmp_path / "d.jsonl", packing=True,
                                        cache_dir=tmp_path / "c", output_dir=tmp_path / "run")
    cfg = compose_run_config("lora_sft", overrides)
    assert cfg.data.packing is True and cfg.data.max_seq_len == 128 and cfg.data.val_split == 0
    assert (cfg.trainer.max_steps, cfg.trainer.micro_batch_size) == (5, 2)
    assert (cfg.optim.lr, str(cfg.optim.scheduler), cfg.optim.warmup_steps) == (
        1e-3, "constant", 0)
    assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.target_modules) == (8, 16, "all-linear")
    assert cfg.kernels.precision == "fp32"
    plan_default = workload.ours_overrides(workload.Settings(), model_dir=tmp_path,
                                           data_path=tmp_path, packing=False, cache_dir=tmp_path)
    assert not any(o.startswith("kernels.") for o in plan_default)
    assert "data.packing=false" in plan_default


def test_model_sizes() -> None:
    from transformers import LlamaForCausalLM

    small = workload.model_config("small")
    assert workload.parameter_count(small) == sum(
        p.numel() for p in LlamaForCausalLM(small).parameters())
    assert 25e6 <= workload.parameter_count(workload.model_config("medium")) <= 40e6
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
    assert workload.parameter_count(workload.model_config("llama3_8b")) == 8_030_261_248


def test_build_model_folder_loads_as_a_llama(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = workload.build_model_folder("small", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == workload.SIZES["small"].hidden
    assert model.config.vocab_size >= len(tokenizer)


def test_rows_have_a_long_tail_of_lengths() -> None:
    from finetune.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    words = workload.vocabulary_words(tokenizer)
    assert len(words) > 50 and all(w.isalpha() and w.islower() for w in words)
    rows = workload.make_rows(400, 256, words)
    assert rows == workload.make_rows(400, 256, words)  # seeded
    lengths = np.array([len(tokenizer.apply_chat_template(r["messages"], tokenize=True,
                                                          return_dict=False)) for r in rows])
    assert 0.25 * 256 < np.median(lengths) < 0.6 * 256
    assert np.percentile(lengths, 99) > 3 * np.median(lengths)  # long tail
    assert 0.01 < np.mean(lengths > 256) < 0.15  # some rows need truncation


def test_lora_adapters_match_peft_all_linear() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from finetune.metrics.flops import TrainingMode

    config = workload.model_config("small")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sorted(TrainingMode.of(model).adapters) == sorted(workload.lora_adapters(config, 4))


# ---------------------------------------------------------------- counting


def _docs(*lengths: int) -> list:
    return [(np.arange(1, n + 1), np.ones(n, dtype=bool)) for n in lengths]


@pytest.mark.parametrize("isolation", [None, "block_mask_4d", "varlen"])
def test_real_tokens_counts_document_tokens_of_every_batch_layout(isolation) -> None:
    collate = Collator(pad_id=0, isolation=isolation)
    rows = [_docs(5), _docs(3), _docs(7)] if isolation is None else [_docs(3, 2), _docs(7)]
    batch = collate(rows)
    assert workload.real_tokens(batch, pad_id=0) == (15 if isolation is None else 12)
    assert workload.trained_tokens(batch) == finetune_trained_tokens(batch)


def test_real_tokens_of_a_padded_batch_is_its_mask() -> None:
    batch = {"input_ids": torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert workload.real_tokens(batch, pad_id=0) == 4


def test_tokens_per_second_leaves_the_warmup_out() -> None:
    tokens, ends = [100, 200, 300, 400], [10.0, 11.0, 13.0, 14.0]
    assert workload.tokens_per_second(tokens, ends, 1) == pytest.approx(900 / 4.0)
    assert workload.tokens_per_second(tokens, ends, 2) == pytest.approx(700 / 3.0)
    with pytest.raises(ValueError):
        workload.tokens_per_second(tokens, ends, 0)
    with pytest.raises(ValueError):
        workload.tokens_per_second(tokens, ends[:3], 1)


def test_loss_at_tokens_averages_the_second_half_of_the_budget() -> None:
    tokens, losses = [10, 10, 10, 10, 10], [5.0, 4.0, 3.0, 2.0, 1.0]
    assert report.loss_at_tokens(tokens, losses, 40) == pytest.approx((3.0 + 2.0) / 2)
    assert report.loss_at_tokens(tokens, losses, 50) == pytest.approx((3.0 + 2.0 + 1.0) / 3)
    with pytest.raises(ValueError):
        report.loss_at_tokens(tokens, losses, 60)


# ---------------------------------------------------------------- the report


def _result(side, tps, startup=10.0, rss=1000.0, tokens=(100,) * 4, loss=2.0, rep=0):
    return report.RunResult(side=side, tokens_per_s=tps, startup_s=startup, peak_rss_mb=rss,
                            step_tokens=list(tokens), losses=[loss] * len(tokens), rep=rep)


def _all_sides() -> list[report.RunResult]:
    results = []
    for rep in range(3):
        results += [_result(("ours", "unpacked"), 300 + rep, startup=8, rss=900, rep=rep),
                    _result(("ours", "packed"), 600 + rep, startup=8, rss=800, rep=rep),
                    _result(("reference", "packed"), 610, tokens=(100,) * 5, rep=rep),
                    _result(("trl", "unpacked"), 200, startup=12, rss=1200, rep=rep),
                    _result(("trl", "packed"), 150 + rep, startup=12, rss=1300, rep=rep)]
    return results


def test_ratios_pair_the_runs_of_each_repetition() -> None:
    ours = [(100, 0), (50, 1), (60, 2)]
    trl = [(90, 0), (80, 1), (55, 2)]
    summary = report.summarize([_result(("ours", "packed"), t, rep=r) for t, r in ours]
                               + [_result(("trl", "packed"), t, rep=r) for t, r in trl])
    assert summary[("ours", "packed")].tokens_per_s / summary[("trl", "packed")].tokens_per_s \
        == pytest.approx(60 / 80)  # a quiet run of one side against a busy one of the other
    assert report.ratios(summary)["speedup_vs_trl_packed"] == pytest.approx(60 / 55)


def test_json_line_has_every_key_and_the_ratios() -> None:
    summary = report.summarize(_all_sides())
    line = report.json_line(summary)
    assert tuple(line) == report.JSON_KEYS
    assert line["ours_tokens_per_s"] == 301 and line["trl_packed_tokens_per_s"] == 151
    assert line["overhead_vs_reference"] == pytest.approx(601 / 610, abs=1e-4)
    assert line["speedup_vs_trl"] == pytest.approx(301 / 200, abs=1e-4)
    assert line["speedup_vs_trl_packed"] == pytest.approx(601 / 151, abs=1e-4)
    assert (line["startup_s"], line["trl_startup_s"]) == (8, 12)
    assert (line["peak_rss_mb"], line["trl_peak_rss_mb"]) == (900, 1200)
    json.dumps(line)


def test_json_line_without_trl_has_null_trl_keys() -> None:
    summary = report.summarize([r for r in _all_sides() if r.side[0] != "trl"])
    line = report.json_line(summary)
    assert tuple(line) == report.JSON_KEYS
    assert line["trl_tokens_per_s"] is None and line["speedup_vs_trl"] is None
    assert line["ours_packed_tokens_per_s"] == 601


def test_loss_is_compared_at_the_tokens_every_side_of_a_mode_saw() -> None:
    results = [report.RunResult(("ours", "packed"), 1, 1, 1, [10] * 4, [4, 3, 2, 1]),
               report.RunResult(("trl", "packed"), 1, 1, 1, [20] * 4, [4, 2, 1, 1])]
    summary = report.summarize(results)
    assert summary[("ours", "packed")].loss_at_budget == pytest.approx(1.5)  # steps 3-4
    assert summary[("trl", "packed")].loss_at_budget == pytest.approx(2.0)  # step 2 (40)


def test_targets_pass_and_miss() -> None:
    summary = report.summarize(_all_sides())
    found = {t.name: t for t in report.targets(summary, "small")}
    assert found["ours / reference, packed batches (tokens/s)"].passed  # 601 / 610
    assert found["ours packed / TRL packed (tokens/s)"].threshold == 4.0
    assert not found["ours packed / TRL packed (tokens/s)"].passed  # 601 / 151 = 3.98
    assert not found["ours unpacked / TRL defaults (tokens/s)"].passed  # 1.5 < 1.8
    assert found["peak RSS ours / TRL, packed"].passed
    assert found["start-up to first step ours / TRL, packed"].passed
    medium = {t.name: t for t in report.targets(summary, "medium")}
    assert medium["ours unpacked / TRL defaults (tokens/s)"].passed  # 1.505 >= 1.5
    assert medium["ours packed / TRL packed (tokens/s)"].passed
    assert all(t.line().startswith(("PASS ", "MISS ")) for t in found.values())


def test_cpu_ratios_are_other_over_ours() -> None:
    results = [_result(("ours", "packed"), 1), _result(("reference", "packed"), 1),
               _result(("trl", "packed"), 1)]
    for result, cpu in zip(results, (0.5, 0.55, 1.5), strict=True):
        result.cpu_s_per_ktok = cpu
    lines = report.cpu_ratios(report.summarize(results))
    assert lines == ["CPU time per real token, reference / ours, packed batches: 1.100",
                     "CPU time per real token, TRL packed / ours packed: 3.000"]


def test_loss_parity_is_the_largest_step_difference() -> None:
    results = [report.RunResult(("ours", "packed"), 1, 1, 1, [5, 5, 5], [3.0, 2.0, 1.0]),
               report.RunResult(("reference", "packed"), 1, 1, 1, [5, 5, 5], [3.0, 2.5, 1.0]),
               report.RunResult(("ours", "unpacked"), 1, 1, 1, [5, 5, 5], [3.0, 2.0, 1.0])]
    assert report.loss_parity(results) == [
        "loss, finetune vs reference loop on the same packed batches: largest per-step "
        "difference 0.5 over 3 steps"]


def test_target_lines() -> None:
    assert report.Target("x", 0.99, 0.97).line() == "PASS x: 0.990 (target >= 0.97)"
    assert report.Target("y", 1.2, 1.0, higher_is_better=False).line().startswith("MISS y")
    assert report.Target("z", None, 1.0).line() == "SKIP z: not measured (target >= 1)"


def test_markdown_table_has_a_row_per_side() -> None:
    table = report.markdown_table(report.summarize(_all_sides()))
    assert len(table.splitlines()) == 2 + 5
    assert "TRL SFTTrainer, packing=True" in table and "601" in table


def test_replace_section_appends_then_replaces() -> None:
    doc = "# Intro\n\nhand-written\n"
    once = report.replace_section(doc, "quick-bf16", "### quick\n\nfirst")
    assert once.startswith(doc.rstrip()) and "first" in once
    twice = report.replace_section(once, "quick-bf16", "### quick\n\nsecond")
    assert "first" not in twice and twice.count("<!-- bench:quick-bf16 -->") == 1
    other = report.replace_section(twice, "medium-bf16", "### medium")
    assert "second" in other and "### medium" in other


def test_recorded_command_leaves_file_locations_out() -> None:
    argv = ["--quick", "--doc", "/somewhere/doc.md", "--keep=/else", "--no-doc", "--repeats", "5"]
    assert bench.recorded_command(argv) == "python scripts/bench.py --quick --repeats 5"


def test_doc_section_states_machine_workload_table_and_targets() -> None:
    args = bench.parse_args(["--quick", "--keep", "/somewhere"])
    summary = report.summarize(_all_sides())
    plan = {"precision": "bf16", "base_dtype": "bf16", "autocast": True, "attention": "sdpa",
            "optimizer": "adamw_fused"}
    lengths = {"median": 90.0, "p90": 200.0, "p99": 400.0, "max": 700}
    label, text = bench.doc_section(args, ["--quick", "--keep", "/somewhere"],
                                    bench.settings_from_args(args), summary,
                                    report.targets(summary, "small"), lengths, plan, (3.0, 1.0))
    assert label == "quick-bf16"
    partial = bench.parse_args(["--quick", "--sides", "ours:packed,trl:packed"])
    assert bench.doc_section(partial, [], bench.settings_from_args(partial), summary, [],
                             lengths, plan, (1.0, 1.0))[0] == "quick-bf16-ours_packed-trl_packed"
    assert "`python scripts/bench.py --quick`" in text and "/somewhere" not in text
    assert "cores, native bf16" in text and "torch " in text and "shared with other" in text
    assert "6.9M-parameter" in text and "seq 256" in text and "median 90 tokens" in text
    assert report.markdown_table(summary) in text
    assert "- PASS ours / reference, packed batches" in text


def test_ours_losses_refuse_other_batches(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 2.0, "trained_tokens": 7},
               {"step": 1, "eval_loss": 1.0}, {"step": 2, "loss": 1.5, "trained_tokens": 9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert runner._ours_losses(tmp_path, [{"trained": 7}, {"trained": 9}]) == [2.0, 1.5]
    with pytest.raises(RuntimeError, match="other batches"):
        runner._ours_losses(tmp_path, [{"trained": 7}, {"trained": 8}])


# ---------------------------------------------------------------- --gpu


@pytest.fixture(scope="module")
def h200_plan() -> dict:
    from finetune.config.kernels import KernelsConfig
    from finetune.hardware.simulated import profile_by_name
    from finetune.kernels import plan
    from finetune.models import model_facts

    facts = model_facts(workload.model_config("llama3_8b"))
    kernel_plan = plan(profile_by_name("h200", assume_packages="all"), KernelsConfig(), facts,
                       packing=True)
    return workload.plan_summary(kernel_plan)


def test_gpu_variants_change_one_family_at_a_time(h200_plan: dict) -> None:
    variants = bench_gpu.gpu_variants(h200_plan)
    offered = h200_plan["offered"]
    assert variants[0].overrides == () and offered["attention"][0] in variants[0].name
    attention = [v.overrides[0].split("=")[1] for v in variants
                 if v.overrides and v.overrides[0].startswith("kernels.attention=")]
    assert attention == offered["attention"][1:] and "sdpa" in attention
    assert ("kernels.fused_ops=none",) in [v.overrides for v in variants]
    assert ("kernels.lora=peft",) in [v.overrides for v in variants]
    assert ("kernels.optimizer=adamw_foreach",) in [v.overrides for v in variants]
    assert [v.side for v in variants[-2:]] == [("trl", "packed"), ("trl", "unpacked")]
    assert len({v.slug for v in variants}) == len(variants)
    assert h200_plan["device"] == "cuda" and h200_plan["hardware"]["peak_bf16_tflops"] > 0


def test_gpu_mfu_from_model_flops() -> None:
    from finetune.metrics.flops import FlopCounter, TrainingMode

    config = workload.model_config("llama3_8b")
    documents = [[2048, 1000, 48], [4096]]
    flops = bench_gpu.model_flops(documents, config, 16)
    counter = FlopCounter(config, TrainingMode(False, workload.lora_adapters(config, 16)))
    batch = {"input_ids": torch.zeros(1, 3096, dtype=torch.long),
             "position_ids": torch.cat([torch.arange(2048), torch.arange(1000),
                                        torch.arange(48)])[None]}
    assert flops[0] == pytest.approx(counter.step([batch]))
    ends = [0.0, 1.0, 3.0]
    value = bench_gpu.mfu([0.0, flops[0], flops[1]], ends, 1, 989.0)
    assert value == pytest.approx((flops[0] + flops[1]) / 3.0 / 989e12)
    assert bench_gpu.mfu(flops, ends[:2], 1, None) is None
    assert math.isfinite(value)


def test_gpu_table_lists_failures() -> None:
    rows = [bench_gpu.median_row("a", [{"tokens_per_s": 10.0, "startup_s": 1.0, "mfu": 0.4,
                                        "peak_mem_gb": 20.0},
                                       {"tokens_per_s": 30.0, "startup_s": 3.0, "mfu": None,
                                        "peak_mem_gb": None}]),
            bench_gpu.median_row("b", [{"error": "boom"}])]
    assert rows[0]["tokens_per_s"] == 20.0 and rows[0]["mfu"] == 0.4
    table = bench_gpu.gpu_table(rows)
    assert "| a | 20 | 40.0% | 20.0 | 2.0 |" in table and "failed: boom" in table
    trl = bench_gpu.median_row("TRL SFTTrainer, packing=True", [
        {"tokens_per_s": 8.0, "startup_s": 1.0, "mfu": None, "peak_mem_gb": None}])
    assert bench_gpu.trl_speedups([rows[0], trl]) == {"speedup_vs_trl_packed": 2.5,
                                                       "speedup_vs_trl": None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_refuses_without_a_gpu(capsys, tmp_path: Path) -> None:
    args = bench.parse_args(["--gpu", "--doc", str(tmp_path / "doc.md")])
    assert bench_gpu.main(args, bench.settings_from_args(args)) == 2
    assert "needs a CUDA or ROCm GPU" in capsys.readouterr().err
    assert not (tmp_path / "doc.md").exists()


def test_trl_config_matches_finetune_settings(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    import bench_trl
    from trl import SFTConfig

    settings = bench.PRESETS["quick"].to_json()
    plan = {"precision": "bf16", "device": "cpu"}
    config = SFTConfig(**bench_trl.sft_config_kwargs(settings, plan, packing=True,
                                                     output_dir=tmp_path, use_cpu=True))
    assert config.packing and config.bf16 and not config.gradient_checkpointing
    assert (config.max_length, config.per_device_train_batch_size) == (256, 8)
    assert (config.learning_rate, str(config.lr_scheduler_type)) == (
        settings["lr"], "SchedulerType.CONSTANT")
    assert config.assistant_only_loss and config.max_grad_norm == 1.0


def test_a_run_stopped_from_outside_runs_once_more(monkeypatch, tmp_path: Path) -> None:
    calls = []

    def stopped_then_done(side, settings, workdir, rep, stats, env, timeout, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 1:
            raise runner.SideInterrupted("finetune, packing off failed with exit code 75:")
        return "result"

    monkeypatch.setattr(runner, "run_side", stopped_then_done)
    assert runner.run_side_retrying(("ours", "unpacked"), None, tmp_path, 0, {}, {}, 1.0) == \
        "result"
    assert calls == [None, "ours-unpacked-again"]

    def always_stopped(*args, **kwargs):
        raise runner.SideInterrupted("stopped")

    monkeypatch.setattr(runner, "run_side", always_stopped)
    with pytest.raises(runner.SideInterrupted):
        runner.run_side_retrying(("ours", "unpacked"), None, tmp_path, 0, {}, {}, 1.0)


def test_summarize_reads_a_kept_workdir(tmp_path: Path, capsys) -> None:
    settings = bench.PRESETS["smoke"]
    (tmp_path / "settings.json").write_text(json.dumps(settings.to_json()))
    step = {"real": 100, "trained": 50, "rows": 2, "width": 64, "documents": [40, 60]}
    (tmp_path / "prepared.json").write_text(json.dumps(
        {"stats": {"packed": [step] * 3, "unpacked": []},
         "lengths": {"median": 30.0, "p90": 60.0, "p99": 90.0, "max": 120}}))
    (tmp_path / "plan.json").write_text(json.dumps({"packed": {
        "precision": "bf16", "base_dtype": "bf16", "autocast": True, "attention": "sdpa",
        "optimizer": "adamw_fused"}}))
    (tmp_path / "run.json").write_text(json.dumps(
        {"argv": ["--smoke", "--sides", "reference:packed,trl:packed"], "load": [1.0, 1.5]}))
    for side, clock in ((["reference", "packed"], {"step_ends": [0.0, 1.0, 2.0],
                                                   "losses": [3.0, 2.0, 1.0]}),
                        (["trl", "packed"], {"step_ends": [0.0, 2.0, 4.0],
                                             "losses": [3.0, 2.5, 2.0],
                                             "step_tokens": [128] * 3,
                                             "step_padded": [128] * 3})):
        run_dir = tmp_path / "runs" / f"{side[0]}-0"
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps({**clock,
                                                         "first_step_end_unix": 1000.5}))
        (run_dir / "launch.json").write_text(json.dumps(
            {"side": side, "rep": 0, "launched_unix": 1000.0, "peak_rss_mb": 500.0}))
    (tmp_path / "runs" / "stopped-0").mkdir()  # interrupted: no result.json, left out
    doc = tmp_path / "doc.md"
    args = bench.parse_args(["--summarize", str(tmp_path), "--doc", str(doc)])
    assert bench.summarize_kept(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["reference_tokens_per_s"] == 100.0  # 200 tokens over 2 s after 1 warm-up
    assert line["trl_packed_tokens_per_s"] == 64.0 and line["ours_tokens_per_s"] is None
    text = doc.read_text()
    assert "<!-- bench:smoke-bf16-reference_packed-trl_packed -->" in text
    assert "`python scripts/bench.py --smoke --sides reference:packed,trl:packed`" in text
