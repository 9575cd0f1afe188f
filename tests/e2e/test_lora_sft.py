"""The supervised fine-tuning recipes (lora_sft, the default, and full_sft) end to end on the
tiny model, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._cli import QUICK, REPO, read_step_metrics, run_cli


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("default") / "run"
    result = run_cli("run", "lora_sft", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_default_run_outputs(default_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "kernel_plan.json", "summary.json",
                 "final/adapter_config.json", "final/adapter_model.safetensors",
                 "final/tokenizer.json", "final/tokenizer_config.json",
                 "checkpoints/step_0000040/manifest.json",
                 "checkpoints/step_0000080/manifest.json"):
        assert (default_run / name).is_file(), name
    steps = read_step_metrics(default_run)
    assert [r["step"] for r in steps] == list(range(1, 81))
    assert all({"step", "loss", "lr"} <= set(r) for r in steps)
    plan = json.loads((default_run / "kernel_plan.json").read_text())
    assert plan["hardware"]["vendor"] == "cpu"
    assert plan["kernels"]["attention"]["choice"] == "sdpa_varlen"  # the CPU plan's first
    # kernels.autotune=auto in a test session: no candidate timed, the matmul rate measured
    assert plan["autotune"]["tuned"] is False and plan["autotune"]["matmul_tflops"]["fp32"] > 0
    assert all(r["mfu_measured"] > 0 for r in steps) and all(r["mfu"] is None for r in steps)
    stdout = (default_run / "stdout.txt").read_text()
    assert "attention:" in stdout and "done." in stdout
    assert "packing off, padding-free rows" in stdout  # unpacked batches carry no padding


def test_default_run_loss_falls(default_run: Path) -> None:
    losses = [r["loss"] for r in read_step_metrics(default_run)]
    tenth = len(losses) // 10
    first = sum(losses[:tenth]) / tenth
    last = sum(losses[-tenth:]) / tenth
    assert last <= 0.8 * first, (first, last)
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["last_loss"] == pytest.approx(last)
    assert summary["eval_loss"] is not None and summary["eval_loss"] < first


def test_adapter_reloads_in_peft_with_identical_logits(default_run: Path) -> None:
    """final/ loads with plain peft and equals the weights the run ended with."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.adapters.export import load_trained_model

    adapter_cfg = json.loads((default_run / "final/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"],
                                                dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(default_run / "final")).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_run / "final")
    ids = tokenizer("Reverse the order of the words: owl fox cat", return_tensors="pt")
    at_end, _ = load_trained_model(default_run / "checkpoints/step_0000080")
    at_end.eval()
    with torch.no_grad():
        expected = at_end(**ids).logits
        got = reloaded(**ids).logits
    assert torch.equal(got, expected)
    base_only = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"],
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base_only(**ids).logits, got)  # the adapter really matters


def test_merge_gives_the_runs_logits(default_run: Path, tmp_path: Path) -> None:
    """`finetune merge` writes a plain HF folder computing what the run's adapter computes."""
    from transformers import AutoModelForCausalLM

    from finetune.adapters.export import load_trained_model

    merged_dir = tmp_path / "merged"
    result = run_cli("merge", str(default_run), str(merged_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    peft_model, tokenizer = load_trained_model(default_run)
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, peft_model.eval()(**ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_seeded_runs_are_identical(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        result = run_cli("run", "lora_sft", *QUICK, f"output_dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append([r["loss"] for r in read_step_metrics(tmp_path / name)])
    assert runs[0] == runs[1]
    other = run_cli("run", "lora_sft", *QUICK, "seed=7", f"output_dir={tmp_path / 'c'}")
    assert other.returncode == 0
    assert [r["loss"] for r in read_step_metrics(tmp_path / "c")] != runs[0]
    a = load_file(str(tmp_path / "a/final/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b/final/adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_sft_trains_every_weight_into_a_plain_model(tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    """The full_sft recipe end to end: no adapter, every weight of the base moves, the loss
    falls, and final/ is a model folder plain transformers loads."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "full"
    result = run_cli("run", "full_sft", *QUICK, f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    final = run_dir / "final"
    assert not (final / "adapter_config.json").exists()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(final / "model.safetensors"))
    assert set(trained) == set(base)
    precision = json.loads((run_dir / "kernel_plan.json").read_text())["kernels"]["precision"]
    unchanged = [name for name in base if torch.equal(base[name].float(), trained[name].float())]
    assert unchanged == [], (f"weights left at the base values with precision "
                             f"{precision['choice']} (trainable_dtype "
                             f"{precision['trainable_dtype']}): {unchanged}")
    losses = [r["loss"] for r in read_step_metrics(run_dir)]
    assert len(losses) == 6 and sum(losses[3:]) / 3 < losses[0] - 0.3, losses
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[name], trained[name].float()) for name in trained)


def test_multirun_sweep(tmp_path: Path) -> None:
    result = run_cli("run", "lora_sft", "-m", "peft.r=2,4", "trainer.max_steps=2",
                     "trainer.micro_batch_size=2", "data.max_seq_len=32",
                     "trainer.eval_every_n_steps=0", "trainer.eval_max_batches=1",
                     f"output_dir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-2000:]
    for job, rank in (("job0", 2), ("job1", 4)):
        adapter = json.loads((tmp_path / "sweep" / job / "final/adapter_config.json").read_text())
        assert adapter["r"] == rank
    assert (tmp_path / "sweep/multirun.yaml").is_file()
    assert not (REPO / "multirun.yaml").exists() and not (REPO / "outputs").exists()


def test_local_model_folder_and_plan_overrides(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Any local HF folder loads through the same path; a forced kernel is really applied."""
    import shutil

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=2",
                     f"model.name_or_path={folder}", "kernels.attention=eager",
                     "kernels.optimizer=adamw_foreach", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attention=eager" in result.stderr  # the model was loaded with the plan's choice
    plan = json.loads((run_dir / "kernel_plan.json").read_text())
    assert plan["kernels"]["attention"]["choice"] == "eager"
    assert plan["kernels"]["optimizer"]["choice"] == "adamw_foreach"
    adapter = json.loads((run_dir / "final/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)


# Runs the CLI with torch.utils.checkpoint.checkpoint counting its calls into a file, so a test
# can see whether activations were recomputed. Patched before transformers imports it.
_COUNTING_CHECKPOINT = """
import sys
import torch.utils.checkpoint as checkpointing
real = checkpointing.checkpoint
def counting(*args, **kwargs):
    with open(sys.argv[1], "a") as calls:
        calls.write("1")
    return real(*args, **kwargs)
checkpointing.checkpoint = counting
from finetune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_gradient_checkpointing_recomputes_and_gives_the_same_losses(tmp_path: Path) -> None:
    losses, recomputed = [], []
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        calls = tmp_path / f"{name}.calls"
        calls.write_text("")
        result = subprocess.run(
            [sys.executable, "-c", _COUNTING_CHECKPOINT, str(calls), "run", "lora_sft", *QUICK,
             "trainer.max_steps=3", f"trainer.gradient_checkpointing={flag}",
             f"output_dir={tmp_path / name}"],
            cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        losses.append([r["loss"] for r in read_step_metrics(tmp_path / name)])
        recomputed.append(len(calls.read_text()))
    assert recomputed[0] == 0 and recomputed[1] > 0, recomputed
    for a, b in zip(*losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_packed_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "lora_sft", *QUICK, "trainer.max_steps=3", "data.packing=true",
                     "data.max_seq_len=256", "trainer.micro_batch_size=2",
                     f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["packing_efficiency"] > 0.8
    assert summary["data"]["packed_sequences"] < summary["data"]["rows"]
