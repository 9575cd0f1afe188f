"""GGUF in, GGUF out: a LoRA run whose base is a GGUF file (`model.name_or_path=*.gguf`), then
`finetune export` of the run, which merges into the base read from that file and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from finetune.cli import main  # noqa: E402
from finetune.export import export_gguf  # noqa: E402


def test_a_lora_run_trains_from_a_gguf_file_and_exports_back(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = export_gguf(tiny_model_dir, tmp_path / "base", verify=False)
    run = tmp_path / "run"
    assert main(["run", "lora_sft", f"model.name_or_path={base}", "trainer.max_steps=2",
                 "trainer.eval_every_n_steps=0", "trainer.save_every_n_steps=0",
                 "kernels.selfcheck=false", f"output_dir={run}"]) == 0
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    # The default run's first loss from the model folder (README): the f16 file trains alike.
    assert losses[0] == pytest.approx(7.663056, abs=1e-3)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert "round trip (f16" in printed and ": pass" in printed
    assert (tmp_path / "out" / "out.gguf").is_file()
