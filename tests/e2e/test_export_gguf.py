"""`finetune export RUN OUT --format gguf` on a real LoRA run of the tiny model: its final/ and
one of its checkpoints are merged, written and round-tripped, with the chat template the run
trained with in the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._cli import QUICK, run_cli

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    quick = [arg for arg in QUICK if not arg.startswith(("trainer.max_steps",
                                                         "trainer.save_every_n_steps"))]
    result = run_cli("run", "lora_sft", *quick, "trainer.max_steps=3",
                     "trainer.save_every_n_steps=2", f"output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("which", ["run", "checkpoint"])
def test_a_lora_run_exports_and_round_trips(lora_run: Path, tmp_path: Path, which: str) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    source = lora_run if which == "run" else lora_run / "checkpoints" / "step_0000002"
    out = tmp_path / "chat-model"
    result = run_cli("export", str(source), str(out), "--format", "gguf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 agreement 100.00%" in result.stdout and ": pass" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "chat-model.gguf"]
    template = AutoTokenizer.from_pretrained(lora_run / "final").chat_template
    reader = GGUFReader(out / "chat-model.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == template
