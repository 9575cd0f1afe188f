"""scripts/gpu_check on CPU: --dry-run runs every section on tiny shapes, in a child process
where finetune's configuration and data packages cannot be imported (as on a node with torch
and the Hugging Face stack only); the leak check can fail; budgets cut a section but keep its
partial results; the report is written after every section."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scripts.gpu_check import context, leak, lora_run, op_profile, runner, sdpa_backend, syncs
from scripts.gpu_check import main as gpu_check_main

ROOT = Path(__file__).resolve().parents[3]
# An image with torch, transformers, accelerate and peft but none of these.
ABSENT = ("hydra", "omegaconf", "orjson", "datasets", "wandb")
# finetune's other dependencies that such an image may lack too (none of the four requires
# pyarrow, matplotlib or tensorboard; rich comes only with some huggingface-hub releases).
ALSO_ABSENT = ("pyarrow", "rich", "matplotlib", "tensorboard")
PRELUDE = f"""
import runpy, sys
for name in {ABSENT + ALSO_ABSENT!r}:
    sys.modules[name] = None  # `import name` raises ModuleNotFoundError, find_spec gives None
sys.argv = ["scripts/gpu_check.py", *sys.argv[1:]]
runpy.run_path({str(ROOT / "scripts" / "gpu_check.py")!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    doc = tmp / "hardware-validation.md"
    page = ROOT / "docs" / "hardware-validation.md"
    before = page.read_bytes()
    proc = subprocess.run([sys.executable, "-c", PRELUDE, "--dry-run", "--out",
                           str(tmp / "report.json"), "--doc", str(doc)],
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert page.read_bytes() == before  # a dry run never touches the checkout's page
    return json.loads((tmp / "report.json").read_text()), doc


def test_dry_run_runs_every_in_process_section(dry_run) -> None:
    report, doc = dry_run
    for name in ("versions", "plan", "step", "op_profile", "sdpa_backend", "leak", "memory",
                 "gemm", "loss_parity", "lora_forward", "resume", "fsdp2", "adamw", "tf32",
                 "selfcheck"):
        assert report[name]["status"] == "ok", (name, report[name])
    assert report["versions"]["missing_packages"] == ["hydra-core", *ABSENT[1:]]
    assert report["liger"]["status"].startswith("skipped: ")
    # `finetune run` composes its config with hydra: named, and the sections after it still ran
    assert report["lora"]["status"].startswith("skipped: needs hydra-core, omegaconf, orjson")
    assert report["multi_gpu"]["status"].startswith("skipped: needs 2+ GPUs")
    assert any(s.startswith("multi_gpu: needs 2+ GPUs") for s in report["skipped"])
    assert not doc.exists()  # only a real GPU run is recorded in the docs


def test_sections_run_most_valuable_first(dry_run) -> None:
    report, _ = dry_run
    names = [name for name, section in report.items() if isinstance(section, dict)
             and "status" in section]
    assert names[:5] == ["versions", "plan", "step", "syncs", "op_profile"]
    assert names.index("leak") < names.index("memory") < names.index("lora")
    # (d), the correctness sections, in the order, before the other measurements
    assert (names.index("leak") < names.index("selfcheck") < names.index("loss_parity")
            < names.index("resume") < names.index("fsdp2") < names.index("memory"))


def test_the_sections_through_correctness_fit_the_run_budget() -> None:
    """Every section up to the last correctness check gets its whole budget inside the run's,
    which leaves time for the interpreter's start within 5 minutes; the end-to-end sections
    after them use what the earlier ones left."""
    names = [name for name, _, _ in gpu_check_main.SECTIONS]
    through = names.index("tf32") + 1
    assert names.index("fsdp2") < through
    assert sum(seconds for _, _, seconds in gpu_check_main.SECTIONS[:through]) <= (
        gpu_check_main.BUDGET_S)
    assert gpu_check_main.BUDGET_S <= 300 - 15


def test_dry_run_resumes_exactly_and_fsdp2_matches(dry_run) -> None:
    report, _ = dry_run
    resume = report["resume"]
    assert resume["device_repeats_bitwise"] is True  # the CPU repeats a run bit for bit
    assert resume["bitwise_equal"] is True and resume["adapters_bitwise_equal"] is True
    assert resume["resumed_losses"] == resume["straight_losses"]
    assert len(resume["straight_losses"]) == resume["steps"] > resume["resumed_at"] > 0
    assert resume["lora_dropout"] > 0  # the RNG's state matters to the resumed steps
    fsdp2 = report["fsdp2"]
    assert (fsdp2["backend"], fsdp2["world_size"]) == ("gloo", 1)
    assert len(fsdp2["losses"]) == fsdp2["steps"] == len(fsdp2["losses_unsharded"])
    assert fsdp2["losses_agree"] is True and fsdp2["max_rel_diff"] < 1e-4


def test_dry_run_measures_the_realistic_step(dry_run) -> None:
    report, _ = dry_run
    step = report["step"]
    assert step["model"]["llama3_8b_layers"] == 32 and step["model"]["lora_rank"] == 16
    assert step["model"]["layers"] == context.CPU.step_model[2]  # fewer layers, stated
    planned = report["plan"]["packed_attention"]["choice"]
    runs = step["runs"]
    assert next(iter(runs)) == planned  # the plan's choice first
    assert f"{planned}+lora=peft" in runs and runs[f"{planned}+lora=peft"]["lora"] == "peft"
    assert {r["isolation"] for r in runs.values()} >= {"varlen", "block_mask_4d"}
    assert all(r["tokens_per_s"] > 0 for r in runs.values())
    assert step["losses_agree"] is True
    assert report["syncs"]["status"].startswith(
        "skipped: torch.cuda.set_sync_debug_mode counts CUDA synchronisations")
    assert report["syncs"]["attention"] == planned
    shares = report["op_profile"]["shares_pct"]
    assert "matrix products" in shares and sum(shares.values()) <= 100.5


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


def test_without_a_gpu_it_refuses_unless_dry_run(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check_main.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def _cpu_context():
    """The dry run's context with this machine's plan (its self-checks are the plan
    section's business, not run here)."""
    import argparse

    from finetune.config.kernels import KernelsConfig
    from finetune.hardware import detect
    from finetune.kernels import ModelFacts, plan

    ctx = context.Context(argparse.Namespace(dry_run=True, skip_lora=True), context.CPU, "cpu",
                          torch.float32)
    ctx.profile = detect()
    facts = ModelFacts(32, 8, 64)
    ctx.plan = plan(ctx.profile, KernelsConfig(), facts, run_selfcheck=False)
    ctx.packed_plan = plan(ctx.profile, KernelsConfig(), facts, run_selfcheck=False, packing=True)
    return ctx


def test_leak_check_fails_when_isolation_is_broken(monkeypatch) -> None:
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

    ctx = _cpu_context()
    monkeypatch.setattr(collate, "Collator", LeakyCollator)
    out: dict = {}
    leak.section_leak(ctx, out)
    assert out["sdpa"]["isolated"] is False and out["eager"]["isolated"] is False


def test_sdpa_backend_of_recorded_ops() -> None:
    assert sdpa_backend.backend_of(["aten._scaled_dot_product_cudnn_attention.default"]) == "cudnn"
    assert sdpa_backend.backend_of(["aten._scaled_dot_product_flash_attention_for_cpu.default"]) == (
        "flash")
    assert sdpa_backend.backend_of(["aten._efficient_attention_forward.default",
                                 "aten._scaled_dot_product_efficient_attention.default"]) == (
        "efficient")
    assert sdpa_backend.backend_of(["aten.bmm.default", "aten._softmax.default"]) == "math"


def test_a_section_past_its_budget_keeps_partial_results() -> None:
    report: dict = {}

    def slow(out: dict) -> None:
        out["first_half"] = 1.0
        time.sleep(5)
        out["second_half"] = 2.0

    runner.run_section(report, "memory", runner.Budget(60), 0.3, slow)
    assert report["memory"]["status"].startswith("timed out")
    assert report["memory"]["first_half"] == 1.0 and "second_half" not in report["memory"]


def test_a_failing_section_is_reported_not_raised() -> None:
    report: dict = {}
    budget = runner.Budget(60)

    def broken(out: dict) -> None:
        out["measured"] = 1.5
        raise RuntimeError("no kernel image is available")

    runner.run_section(report, "attention", budget, 1, broken)
    assert report["attention"]["status"].startswith("failed: RuntimeError: no kernel image")
    assert report["attention"]["measured"] == 1.5  # partial results are kept
    runner.run_section(report, "lora", runner.Budget(0), 30, broken)
    assert report["lora"]["status"].startswith("skipped")


def test_skip_is_reported_as_skipped() -> None:
    report: dict = {}

    def not_here(out: dict) -> None:
        raise runner.Skip("cuDNN attention is NVIDIA-only")

    runner.run_section(report, "cudnn", runner.Budget(60), 5, not_here)
    assert report["cudnn"]["status"] == "skipped: cuDNN attention is NVIDIA-only"
    assert runner.skipped_checks(report) == ["cudnn: cuDNN attention is NVIDIA-only"]


def test_lora_command_and_results(tmp_path: Path) -> None:
    command = lora_run.lora_command(Path("/m"), tmp_path / "run", 2048, 40)
    assert command[1:5] == ["-m", "finetune.cli", "run", "lora_sft"]
    for item in ("model.name_or_path=/m", "data.packing=true", "data.max_seq_len=2048",
                 "trainer.max_steps=40"):
        assert item in command
    assert lora_run.lora_command(Path("/m"), tmp_path, 2048, 40, nproc=2)[-1] == "--nproc=2"
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": i, "loss": 5.0 - i, "tokens_per_s": 1000.0 * i, "mfu": 0.1 * i,
             "step_time_s": 1.0} for i in range(1, 7)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"peak_memory_gb": 12.5,
                                                  "trained_tokens_per_s": 900.0}))
    (run / "kernel_plan.json").write_text(json.dumps({"kernels": {
        "attention": {"choice": "flash_attention_3", "selfcheck": "passed"}}}))
    result = lora_run.lora_results(run, warmup_steps=3)
    assert result["steps_measured"] == 3
    assert result["median_tokens_per_s"] == 5000.0 and result["median_mfu"] == pytest.approx(0.5)
    assert (result["first_loss"], result["last_loss"]) == (4.0, -1.0)
    assert result["peak_memory_gb"] == 12.5
    assert result["kernels"] == {"attention": "flash_attention_3"}


def test_shadow_package_has_the_installed_layout(tmp_path: Path) -> None:
    dest = context.shadow_package(ROOT, tmp_path)
    package = dest / "finetune"
    assert (package / "__init__.py").resolve() == ROOT / "finetune" / "__init__.py"
    assert (package / "configs" / "lora_sft.yaml").is_file()
    assert (package / "recipes").resolve() == ROOT / "recipes"


def test_validation_section_quotes_only_measured_figures() -> None:
    report = {
        "date": "2026-12-01", "wall_s": 301.0,
        "versions": {"status": "ok", "torch": "2.10.0"},
        "plan": {"status": "ok", "plan": {"hardware": {"name": "NVIDIA H200", "arch": "sm_90"}}},
        "gemm": {"status": "ok", "tflops": 812.3, "fraction_of_peak": 0.821},
        "lora": {"status": "timed out: ran past its 120s budget (partial results kept)",
                 "median_tokens_per_s": 123.0},
        "resume": {"status": "ok", "bitwise_equal": True, "adapters_bitwise_equal": True,
                   "device_repeats_bitwise": False},
        "fsdp2": {"status": "ok", "backend": "nccl", "max_rel_diff": 0.0031, "peak_gib": 4.2},
    }
    text = runner.validation_section(report, Path("gpu_check-2026-12-01.json"))
    assert text.startswith("### 2026-12-01: NVIDIA H200 (sm_90), torch 2.10.0")
    assert "812.3 TFLOP/s" in text
    assert "| resume | ok | losses bitwise equal True, adapters True (the device repeats a run " \
           "bit for bit: False) |" in text
    assert "| fsdp2 | ok | nccl, losses within 0.0031 (relative) of unsharded, peak 4.2 GiB |" in text
    assert "123.0" not in text  # a section that did not finish quotes no figure


def test_each_section_is_written_as_soon_as_it_ends(tmp_path: Path, monkeypatch) -> None:
    """A run cut off in its third section (here by Ctrl-C) leaves a report, and the validation
    page's section, holding the two sections that ended."""
    doc = tmp_path / "hardware-validation.md"
    doc.write_text("# Hardware validation\n")

    def fake(name: str, module: str):
        def run(ctx, out: dict) -> None:
            if name == "step":
                raise KeyboardInterrupt
            out["measured"] = name
            ctx.plan = object()
        return run

    monkeypatch.setattr(gpu_check_main, "SECTIONS", (("versions", "machine", 5),
                                                     ("plan", "machine", 5), ("step", "step", 5)))
    monkeypatch.setattr(gpu_check_main, "section_function", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU run writes the doc
    with pytest.raises(KeyboardInterrupt):
        gpu_check_main.main(["--out", str(tmp_path / "report.json"), "--doc", str(doc)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["versions"]["measured"] == "versions" and report["plan"]["status"] == "ok"
    assert "step" not in report
    text = doc.read_text()
    assert text.startswith("# Hardware validation\n") and "| plan | ok |" in text


def test_the_validation_section_is_replaced_not_appended(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text("intro\n")
    report = {"date": "2026-12-07"}
    writer = runner.ReportWriter(report, tmp_path / "r.json", doc, time.monotonic())
    report["versions"] = {"status": "ok", "torch": "2.13.0"}
    writer.write()
    report["gemm"] = {"status": "ok", "tflops": 700.0, "fraction_of_peak": 0.7}
    writer.write()
    text = doc.read_text()
    assert text.count("### 2026-12-07") == 1 and "700.0 TFLOP/s" in text
    assert text.startswith("intro\n")
    assert json.loads((tmp_path / "r.json").read_text())["gemm"]["tflops"] == 700.0


def test_a_section_names_the_packages_it_needs(monkeypatch) -> None:
    report: dict = {}
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    runner.run_section(report, "lora", runner.Budget(60), 5,
                       lambda out: runner.needs("hydra", "omegaconf", "json"))
    assert report["lora"]["status"].startswith("skipped: needs omegaconf (not installed here")


def test_a_sync_is_reported_at_its_call_site() -> None:
    stack = [
        traceback.FrameSummary("/x/scripts/gpu_check/step.py", 90, "optimizer_step"),
        traceback.FrameSummary("/v/site-packages/finetune/train/loss.py", 79, "causal_lm_loss"),
        traceback.FrameSummary("/v/site-packages/transformers/masking_utils.py", 12, "mask"),
        traceback.FrameSummary("/v/site-packages/torch/nn/functional.py", 5, "pad"),
    ]
    assert syncs.call_site(stack) == "transformers/masking_utils.py:12 (mask)"
    assert syncs.call_site(stack[:2]) == "finetune/train/loss.py:79 (causal_lm_loss)"


def test_op_shares_group_matmuls_and_attention() -> None:
    events = [SimpleNamespace(key="aten::mm", self_cpu_time_total=50.0),
              SimpleNamespace(key="aten::addmm", self_cpu_time_total=10.0),
              SimpleNamespace(key="aten::_scaled_dot_product_flash_attention_for_cpu",
                              self_cpu_time_total=20.0),
              SimpleNamespace(key="Optimizer.step", self_cpu_time_total=90.0)]
    assert op_profile.op_shares(events, 100.0, device=False) == {
        "matrix products": 60.0, "attention": 20.0, "outside aten ops": 20.0}
    kernels = [SimpleNamespace(key="nvjet_tst_128x256_64x4", device_type="DeviceType.CUDA",
                               self_device_time_total=30.0),
               SimpleNamespace(key="aten::mm", device_type="DeviceType.CPU",
                               self_device_time_total=30.0),
               SimpleNamespace(key="cudnn_generated_fort_native_sdpa_sm90",
                               device_type="DeviceType.CUDA", self_device_time_total=10.0)]
    assert op_profile.op_shares(kernels, 40.0, device=True) == {"matrix products": 75.0,
                                                               "attention": 25.0}


def _mask_builds(monkeypatch) -> list[str]:
    """Where the collator builds packed rows' masks: 'host' (numpy, then moved) or the device
    of the document ids it builds them from."""
    import finetune.data.collate as collate

    built: list[str] = []
    on_host, on_device = collate.block_diagonal_mask, collate.document_mask

    def host(*args):
        built.append("host")
        return on_host(*args)

    def device(doc_index, dtype):
        built.append(f"4d on {doc_index.device.type}")
        return on_device(doc_index, dtype)

    def flex(doc_index):  # a BlockMask cannot be made on the meta device; where is what counts
        built.append(f"flex on {doc_index.device.type}")
        return "block mask"

    monkeypatch.setattr(collate, "block_diagonal_mask", host)
    monkeypatch.setattr(collate, "document_mask", device)
    monkeypatch.setattr(collate, "flex_block_mask", flex)
    return built


def test_step_batches_build_their_masks_on_the_run_device(monkeypatch) -> None:
    """On a GPU the step, syncs and op_profile sections build each batch's 4D or flex mask on
    the GPU, as training does, not on the host then moved (a 2048 x 2048 mask per row). The
    meta device stands in for the GPU."""
    from scripts.gpu_check import step

    built = _mask_builds(monkeypatch)
    ctx = context.Context(SimpleNamespace(dry_run=True), context.CPU, "meta", torch.float32)
    batches = step.step_batches(ctx, "block_mask_4d", 2)
    assert built == ["4d on meta", "4d on meta"]
    assert batches[0].batch["attention_mask"].device.type == "meta"
    assert batches[0].trained > 0  # counted on the host batch
    built.clear()
    step.step_batches(ctx, "flex_block_mask", 1)
    assert built == ["flex on meta"]


def test_leak_check_builds_its_masks_on_the_run_device(monkeypatch) -> None:
    """The leak section's packed batches get their masks where the models run (meta stands in
    for the GPU; the forward and backward are stubbed, only the batches are looked at)."""
    ctx = _cpu_context()
    ctx.device = "meta"
    built = _mask_builds(monkeypatch)
    masks: list[str] = []

    def forward_backward(model, batch, spans):
        mask = batch.get("attention_mask")
        masks.append("none" if mask is None else f"{mask.dim()}d on {mask.device.type}")
        return torch.ones(1, batch["input_ids"].shape[1], 1), {"w": torch.ones(1)}

    monkeypatch.setattr(leak, "_forward_backward", forward_backward)
    out: dict = {}
    leak.section_leak(ctx, out)
    four_d = [name for name in ("sdpa", "eager") if out[name]["isolation"] == "block_mask_4d"]
    assert four_d and "host" not in built and built.count("4d on meta") == len(four_d)
    assert "4d on cpu" not in masks
