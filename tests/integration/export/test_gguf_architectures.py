"""GGUF export of a Qwen2-shaped and a Mistral-shaped random model with grouped-query attention,
each saved as a model folder and round-tripped through transformers' GGUF loader.

The Qwen2 model gets a byte-level BPE tokenizer trained here with Qwen2's split regex (the family
Llama 3 and Qwen2 ship) and tied embeddings; the Mistral model the tiny model's sentencepiece-style
tokenizer and a head_dim that is not hidden_size / heads; a Llama model a Llama-3-style byte-level
tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader  # noqa: E402

from finetune.export import export_gguf  # noqa: E402
from finetune.export.gguf_vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = ["What is the capital of France? Paris is the capital of France.",
        "Name three primary colours, please: red, yellow and blue.",
        "Write 2+2 in words. Four. And 3 times 7? Twenty-one, that's 21.",
        "You answer in one short sentence; the user asks, the assistant replies."] * 4


def _byte_level_tokenizer(split: str = _QWEN2_SPLIT):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_qwen2_with_gqa_tied_embeddings_and_a_byte_level_tokenizer(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _byte_level_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer) + 20, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rope_theta=1_000_000.0, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # biases non-zero, so a dropped bias shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
    src = _save(model, tokenizer, tmp_path / "qwen2")

    path, result = export_gguf(src, tmp_path / "qwen2-gguf", quant="f16")
    assert result.passed, result.summary()
    reader = GGUFReader(path)
    fields = {key: reader.fields[key].contents() for key in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "qwen2.attention.head_count_kv", "qwen2.rope.freq_base", "tokenizer.chat_template")}
    assert fields == {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2",
                      "tokenizer.ggml.pre": "qwen2", "qwen2.attention.head_count_kv": 2,
                      "qwen2.rope.freq_base": 1_000_000.0, "tokenizer.chat_template": CHATML}
    eot = reader.fields["tokenizer.ggml.eot_token_id"].contents()
    assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "blk.1.attn_k.bias" in names  # tied; biases kept
    assert (path.parent / "Modelfile").read_text() == (
        'FROM ./qwen2-gguf.gguf\nPARAMETER stop "<|im_end|>"\n')


def test_llama_with_a_llama3_style_byte_level_tokenizer(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer(_LLAMA3_SPLIT)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=500_000.0))
    src = _save(model, tokenizer, tmp_path / "llama3")

    path, result = export_gguf(src, tmp_path / "llama3-gguf")
    assert result.passed, result.summary()
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_mistral_with_gqa_and_its_own_head_dim(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=None,
        max_position_embeddings=1024, rms_norm_eps=1e-6))
    src = _save(model, tokenizer, tmp_path / "mistral")

    path, result = export_gguf(src, tmp_path / "mistral-gguf", quant="f16")
    assert result.passed, result.summary()
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"  # as llama.cpp runs it
    assert reader.fields["llama.attention.head_count_kv"].contents() == 1
    assert reader.fields["llama.rope.dimension_count"].contents() == 32
    assert reader.fields["llama.attention.key_length"].contents() == 32


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}


def _scaled_llama(tmp_path: Path, tiny_model_dir: Path, rope: dict) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters=rope))
    return _save(model, tokenizer, tmp_path / rope["rope_type"])


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, LINEAR_ROPE], ids=["llama3", "linear"])
def test_rope_scaling_is_written_and_checked(tmp_path: Path, tiny_model_dir: Path,
                                             rope: dict) -> None:
    path, result = export_gguf(_scaled_llama(tmp_path, tiny_model_dir, rope), tmp_path / "out")
    assert result.passed and result.rope_match, result.summary()
    reader = GGUFReader(path)
    if rope["rope_type"] == "llama3":  # llama.cpp's per-frequency factors: 1 up to `factor`
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)
    else:
        assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0


def test_a_file_without_the_llama3_rope_factors_fails_the_round_trip(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    import numpy as np

    import finetune.export.gguf as writer
    from finetune.export import ExportVerificationError

    monkeypatch.setattr(writer, "rope_factors",
                        lambda model, head_dim: np.ones(head_dim // 2, dtype=np.float32))
    with pytest.raises(ExportVerificationError, match="rope scaling DIFFERS"):
        export_gguf(_scaled_llama(tmp_path, tiny_model_dir, LLAMA3_ROPE), tmp_path / "out")
    assert not (tmp_path / "out").exists()
