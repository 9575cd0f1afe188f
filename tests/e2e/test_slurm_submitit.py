"""hydra/launcher=submitit_local: sweep jobs run by submitit's local executor, each in its own
process, as a SLURM job would run on a node; each hands its exit code back to the sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._cli import QUICK, read_step_metrics, run_cli


@pytest.mark.slow
def test_submitit_local_runs_the_jobs_and_reports_a_failed_one(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("run", "lora_sft", "-m", "hydra/launcher=submitit_local", *QUICK,
                     "trainer.max_steps=5", "peft.r=4,0", f"output_dir={sweep}", timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]  # job 1's exit code, from its process
    job0 = sweep / "job0"
    assert (job0 / "final/adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_step_metrics(job0)] == [1, 2, 3, 4, 5]
    ends = {line.split("]")[0]: line for line in result.stdout.splitlines()
            if line.startswith("[sweep job")}
    assert "peft.r=4" in ends["[sweep job 0"] and ends["[sweep job 0"].endswith(": done")
    assert ends["[sweep job 1"].endswith(": failed (2)")
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: job 1 (") and "peft.r=0 must be a positive number" in error
    # each job's console output is in its submitit folder, not this command's
    outputs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(outputs) == 2
    assert any("step 5/5" in path.read_text() for path in outputs)
    assert "step 5/5" not in result.stdout
