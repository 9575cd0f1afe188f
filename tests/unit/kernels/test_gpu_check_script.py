"""scripts/gpu_check.py on CPU: --dry-run runs every in-process section on tiny shapes, in this
process; the leak check can fail; budgets cut a section but keep its partial results."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(gpu_check, tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    doc = tmp / "hardware-validation.md"
    code = gpu_check.main(["--dry-run", "--out", str(tmp / "report.json"), "--doc", str(doc)])
    assert code == 0
    return json.loads((tmp / "report.json").read_text()), doc


def test_dry_run_runs_every_in_process_section(dry_run) -> None:
    report, doc = dry_run
    for name in ("versions", "plan", "sdpa_backend", "leak", "memory", "gemm", "loss_parity",
                 "lora_forward", "adamw", "tf32", "selfcheck"):
        assert report[name]["status"] == "ok", (name, report[name])
    assert report["liger"]["status"].startswith("skipped: ")
    assert report["lora"]["status"].startswith("skipped: --dry-run")
    assert report["multi_gpu"]["status"].startswith("skipped: needs 2+ GPUs")
    assert any(s.startswith("multi_gpu: needs 2+ GPUs") for s in report["skipped"])
    assert not doc.exists()  # only a real GPU run is recorded in the docs


def test_dry_run_findings(dry_run) -> None:
    report, _ = dry_run
    assert report["plan"]["plan"]["kernels"]["attention"]["selfcheck"] == "passed"
    backend = report["sdpa_backend"]["sdpa"]
    assert backend["sdpa_backend"]["match"] and backend["sdpa_backend_masked"]["match"]
    for name in ("sdpa", "eager"):
        leak = report["leak"][name]
        assert leak["isolated"] and leak["logits_error_if_leaking"] > 0.1
    assert "flex_attention" in report["leak"]["unsupported"]  # no backward on CPU: named
    assert report["loss_parity"]["sdpa"]["max_diff_vs_eager"] < 1e-4
    lora = report["lora_forward"]
    layers = 7 * 2  # the CPU parity model: 2 layers of q, k, v, o, gate, up, down
    assert lora["fused_layers"] == layers and lora["peft_layers"] == 0
    assert lora["loss_diff"] < 1e-5 and lora["grad_cosine"] > 0.9999
    assert all(case["match"] for case in report["adamw"].values() if isinstance(case, dict))
    assert report["tf32"]["consistent"] is True
    assert report["selfcheck"]["sdpa"] == "passed"
    masked = report["selfcheck"]["masked_seq_mod_128_is_64"]
    assert masked["seq"] % 128 == 64 and masked["routed_grad_q_finite"]


def test_without_a_gpu_it_refuses_unless_dry_run(gpu_check, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def _cpu_context(gpu_check):
    import argparse

    ctx = gpu_check.Context(argparse.Namespace(dry_run=True, skip_lora=True), gpu_check.CPU,
                            "cpu", torch.float32)
    gpu_check.section_plan(ctx, {})
    return ctx


def test_leak_check_fails_when_isolation_is_broken(gpu_check, monkeypatch) -> None:
    """A collator whose block mask is plain causal lets documents see each other: the leak
    section must report it."""
    import finetune.data.collate as collate

    real = collate.Collator

    class LeakyCollator(real):
        def __call__(self, rows):
            batch = super().__call__(rows)
            if self.isolation == "block_mask_4d":
                n = batch["input_ids"].shape[1]
                causal = torch.full((n, n), torch.finfo(self.mask_dtype).min).triu(1)
                batch["attention_mask"] = causal[None, None].expand_as(batch["attention_mask"])
            return batch

    ctx = _cpu_context(gpu_check)
    monkeypatch.setattr(collate, "Collator", LeakyCollator)
    out: dict = {}
    gpu_check.section_leak(ctx, out)
    assert out["sdpa"]["isolated"] is False and out["eager"]["isolated"] is False


def test_sdpa_backend_of_recorded_ops(gpu_check) -> None:
    assert gpu_check.backend_of(["aten._scaled_dot_product_cudnn_attention.default"]) == "cudnn"
    assert gpu_check.backend_of(["aten._scaled_dot_product_flash_attention_for_cpu.default"]) == (
        "flash")
    assert gpu_check.backend_of(["aten._efficient_attention_forward.default",
                                 "aten._scaled_dot_product_efficient_attention.default"]) == (
        "efficient")
    assert gpu_check.backend_of(["aten.bmm.default", "aten._softmax.default"]) == "math"


def test_a_section_past_its_budget_keeps_partial_results(gpu_check) -> None:
    report: dict = {}

    def slow(out: dict) -> None:
        out["first_half"] = 1.0
        time.sleep(5)
        out["second_half"] = 2.0

    started = time.monotonic()
    gpu_check.run_section(report, "memory", gpu_check.Budget(60), 0.3, slow)
    assert time.monotonic() - started < 3
    assert report["memory"]["status"].startswith("timed out")
    assert report["memory"]["first_half"] == 1.0 and "second_half" not in report["memory"]


def test_a_failing_section_is_reported_not_raised(gpu_check) -> None:
    report: dict = {}
    budget = gpu_check.Budget(60)

    def broken(out: dict) -> None:
        out["measured"] = 1.5
        raise RuntimeError("no kernel image is available")

    gpu_check.run_section(report, "attention", budget, 1, broken)
    assert report["attention"]["status"].startswith("failed: RuntimeError: no kernel image")
    assert report["attention"]["measured"] == 1.5  # partial results are kept
    gpu_check.run_section(report, "lora", gpu_check.Budget(0), 30, broken)
    assert report["lora"]["status"].startswith("skipped")


def test_skip_is_reported_as_skipped(gpu_check) -> None:
    report: dict = {}

    def not_here(out: dict) -> None:
        raise gpu_check.Skip("cuDNN attention is NVIDIA-only")

    gpu_check.run_section(report, "cudnn", gpu_check.Budget(60), 5, not_here)
    assert report["cudnn"]["status"] == "skipped: cuDNN attention is NVIDIA-only"
    assert gpu_check.skipped_checks(report) == ["cudnn: cuDNN attention is NVIDIA-only"]


def test_lora_command_and_results(gpu_check, tmp_path: Path) -> None:
    command = gpu_check.lora_command(Path("/m"), tmp_path / "run", 2048, 40)
    assert command[1:5] == ["-m", "finetune.cli", "run", "lora_sft"]
    for item in ("model.name_or_path=/m", "data.packing=true", "data.max_seq_len=2048",
                 "trainer.max_steps=40"):
        assert item in command
    assert gpu_check.lora_command(Path("/m"), tmp_path, 2048, 40, nproc=2)[-1] == "--nproc=2"
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "loss": 5.0 - i, "tokens_per_s": 1000.0 * i, "mfu": 0.1 * i,
             "step_time_s": 1.0} for i in range(1, 7)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"peak_memory_gb": 12.5,
                                                  "trained_tokens_per_s": 900.0}))
    (run / "kernel_plan.json").write_text(json.dumps({"kernels": {
        "attention": {"choice": "flash_attention_3", "selfcheck": "passed"}}}))
    result = gpu_check.lora_results(run, warmup_steps=3)
    assert result["steps_measured"] == 3
    assert result["median_tokens_per_s"] == 5000.0 and result["median_mfu"] == pytest.approx(0.5)
    assert (result["first_loss"], result["last_loss"]) == (4.0, -1.0)
    assert result["peak_memory_gb"] == 12.5
    assert result["kernels"] == {"attention": "flash_attention_3"}


def test_shadow_package_has_the_installed_layout(gpu_check, tmp_path: Path) -> None:
    dest = gpu_check.shadow_package(ROOT, tmp_path)
    package = dest / "finetune"
    assert (package / "__init__.py").resolve() == ROOT / "finetune" / "__init__.py"
    assert (package / "configs" / "lora_sft.yaml").is_file()
    assert (package / "recipes").resolve() == ROOT / "recipes"


def test_validation_section_quotes_only_measured_figures(gpu_check) -> None:
    report = {
        "date": "2026-12-01", "wall_s": 301.0,
        "versions": {"status": "ok", "torch": "2.10.0"},
        "plan": {"status": "ok", "plan": {"hardware": {"name": "NVIDIA H200", "arch": "sm_90"}}},
        "gemm": {"status": "ok", "tflops": 812.3, "fraction_of_peak": 0.821},
        "lora": {"status": "timed out: ran past its 120s budget (partial results kept)",
                 "median_tokens_per_s": 123.0},
    }
    text = gpu_check.validation_section(report, Path("gpu_check-2026-12-01.json"))
    assert text.startswith("### 2026-12-01: NVIDIA H200 (sm_90), torch 2.10.0")
    assert "812.3 TFLOP/s" in text
    assert "123.0" not in text  # a section that did not finish quotes no figure
