"""`finetune export --format gguf` on the tiny model and on a LoRA adapter of it: the file is read
back by transformers' GGUF loader (the round trip) and by gguf's own reader, and every failure
leaves nothing under OUT."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader  # noqa: E402

from finetune.cli import main  # noqa: E402
from finetune.export import export_gguf  # noqa: E402
from finetune.export.roundtrip import STORED_MAX_ABS_DIFF  # noqa: E402
from finetune.models.tiny import TINY_CHAT_TEMPLATE  # noqa: E402


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []


def test_tiny_model_round_trips_in_f16_with_its_tokenizer_and_template(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-chat"
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert "round trip (f16" in printed and ": pass" in printed
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "tiny-chat.gguf"]
    assert (out / "Modelfile").read_text() == 'FROM ./tiny-chat.gguf\nPARAMETER stop "<|end|>"\n'
    reader = GGUFReader(out / "tiny-chat.gguf")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.head_count") == 8
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.context_length") == 2048
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == TINY_CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.eot_token_id") == 2  # <|end|> closes every turn
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # the template writes BOS
    assert "blk.5.attn_q.weight" in {t.name for t in reader.tensors}


@pytest.mark.parametrize("quant", ["q8_0", "bf16"])
def test_quantised_exports_round_trip(tiny_model_dir: Path, tmp_path: Path, quant: str) -> None:
    path, result = export_gguf(tiny_model_dir, tmp_path / "out", quant=quant)
    assert result.passed and result.tokens_match and result.template_match
    assert result.top1_agreement >= 0.99
    assert result.stored_max_abs_diff <= STORED_MAX_ABS_DIFF
    assert result.max_abs_diff > 0  # the storage did round: the comparison could fail
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_without_the_rotary_permutation_the_round_trip_fails_and_keeps_nothing(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """llama.cpp's llama architecture expects q/k rows interleaved per head; a file written in
    Hugging Face's order loads with scrambled attention, and the round trip must say so."""
    import finetune.export.gguf as writer

    monkeypatch.setattr(writer, "interleave_rotary", lambda weight, n_heads: weight)
    out = tmp_path / "made" / "out"
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "does not reproduce" in err and "FAIL" in err and f"Nothing was written to {out}" in err
    assert not (tmp_path / "made").exists()  # nor the parent this export created


def test_lora_adapter_is_merged_before_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter with random B (a fresh LoRA changes nothing): the file holds base + update."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.adapters import apply_adapter
    from finetune.config.schema import PeftConfig

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    lora = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PeftConfig),
                                               {"method": "lora", "r": 4, "alpha": 8}))
    model = apply_adapter(load_base(), lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    adapter = tmp_path / "run" / "final"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    merged_q = model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    base_q = load_base().model.layers[0].self_attn.q_proj.weight.detach()

    path, result = export_gguf(adapter, tmp_path / "lora-gguf")
    assert result.passed
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)
    q = loaded.model.layers[0].self_attn.q_proj.weight.detach()
    assert (q - merged_q).abs().max() < 1e-3  # f16 rounding only
    assert (q - base_q).abs().max() > 1e-2  # the adapter's update is in the file


def test_a_full_disk_while_writing_is_one_paragraph_and_leaves_nothing(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    import finetune.export.gguf as writer

    def fill_the_disk(model, tokenizer, path, **kwargs) -> None:
        path.write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_gguf", fill_the_disk)
    out = tmp_path / "out"
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf"]) == 1
    err = capsys.readouterr().err
    assert "the GGUF file out" in err and "Nothing was written there" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_unsupported_architecture_is_refused_with_the_supported_list(
        tmp_path: Path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(src)
    out = tmp_path / "out"
    assert main(["export", str(src), str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "supports the architectures llama, mistral, qwen2" in err and "'gpt2'" in err
    assert "Traceback" not in err
    assert _left_beside(out) == ["gpt2"]


def test_a_truncated_weight_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path,
                                                  capsys) -> None:
    src = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, src)
    with open(src / "model.safetensors", "r+b") as weights:
        weights.truncate(100_000)
    out = tmp_path / "out"
    assert main(["export", str(src), str(out), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is damaged or incomplete" in err and "Traceback" not in err
    assert _left_beside(out) == ["damaged"]


def test_an_out_that_cannot_be_written_exits_2(tiny_model_dir: Path, capsys) -> None:
    assert main(["export", str(tiny_model_dir), "/proc/finetune-export/out", "--format",
                 "gguf"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the GGUF export to /proc/finetune-export/out" in err
    assert "Traceback" not in err


def test_a_non_empty_out_is_not_overwritten(tiny_model_dir: Path, tmp_path: Path,
                                            capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
