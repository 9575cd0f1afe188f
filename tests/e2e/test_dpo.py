"""The dpo recipe end to end on the tiny model, as a user runs it: with no overrides it trains
offline on the bundled preference pairs and the reward margin and accuracy rise; the reference
variants (a frozen copy for a full fine-tune, precomputed log-probs) and IPO run; bad data and
settings are refused with their location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._cli import QUICK, read_step_metrics, run_cli

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = run_cli("run", "dpo", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_default_dpo_run_raises_the_reward_margin(dpo_run: Path) -> None:
    steps = read_step_metrics(dpo_run)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 40
    assert all(set(DPO_METRICS) <= set(r) for r in steps)
    tenth = len(steps) // 10
    first = [r["rewards/margin"] for r in steps[:tenth]]
    last = [r["rewards/margin"] for r in steps[-tenth:]]
    assert sum(last) / tenth > sum(first) / tenth + 1.0
    assert sum(r["rewards/accuracy"] for r in steps[-tenth:]) / tenth > 0.9
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # policy == reference at step 1
    assert steps[-1]["loss"] < 0.3
    for name in ("final/adapter_config.json", "final/adapter_model.safetensors",
                 "summary.json", "kernel_plan.json"):
        assert (dpo_run / name).is_file(), name
    stdout = (dpo_run / "stdout.txt").read_text()
    assert "done." in stdout
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["data"]["format"] == "preference"
    assert summary["eval_loss"] is not None and summary["eval_loss"] < 0.6931


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 64 bundled pairs: enough for a few steps, cheap to precompute over."""
    from finetune.data.sources import BUNDLED_DIR

    rows = (BUNDLED_DIR / "preferences.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# Each reference (a frozen copy of the base for a full fine-tune, log-probs precomputed with
# the adapter or with the base; the default LoRA-disabled one is dpo_run's) and each loss
# (sigmoid with label smoothing, IPO) runs once: a loss variant rides along with a reference
# variant, as the two choices meet only in the loss's inputs (three runs, not five).
@pytest.mark.parametrize("overrides", [
    ["peft=none", "optim.lr=1e-4", "dpo.label_smoothing=0.1"],
    ["dpo.precompute_ref=true", "dpo=ipo", "dpo.beta=0.5"],
    ["peft=none", "dpo.precompute_ref=true", "optim.lr=1e-4"],
])
def test_reference_and_loss_variants_train(tmp_path: Path, small_pairs: Path,
                                           overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("run", "dpo", *QUICK, f"data.path={small_pairs}", *overrides,
                     f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_step_metrics(run_dir)
    assert len(steps) == 6 and all(set(DPO_METRICS) <= set(r) for r in steps)
    assert steps[-1]["rewards/margin"] > steps[0]["rewards/margin"]


def test_missing_rejected_names_the_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    '{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    result = run_cli("run", "dpo", *QUICK, f"data.path={data}", "data.val_split=0",
                     f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert f"{data}:2: missing field 'rejected'" in result.stderr


def test_packing_is_refused_before_any_work(tmp_path: Path) -> None:
    result = run_cli("run", "dpo", "data.packing=true", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "data.packing=true is not supported for preference pairs" in result.stderr
    assert not (tmp_path / "run").exists()
