"""`model.name_or_path=path/to/model.gguf`: a model held only as GGUF is read through
transformers' GGUF loader with its tokenizer, chat template and rope scaling, trains, and a
damaged or missing file is a clear error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from finetune.config.schema import ModelConfig  # noqa: E402
from finetune.errors import ConfigError  # noqa: E402
from finetune.export import export_gguf  # noqa: E402
from finetune.models import load_model, load_model_config, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny",
                          verify=False)
    return path


def _chat_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}],
        tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_tiny_model_read_from_gguf_matches_its_folder(
        tiny_gguf: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = ModelConfig(name_or_path=str(tiny_model_dir))
    gguf = ModelConfig(name_or_path=str(tiny_gguf))
    with caplog.at_level(logging.INFO, logger="finetune.models.gguf_input"):
        model = load_model(gguf, attn_implementation="sdpa", dtype=torch.float32)
    assert "dequantised to torch.float32" in caplog.text and "F16" in caplog.text
    reference = load_model(folder, attn_implementation="sdpa", dtype=torch.float32)
    tokenizer, expected = load_tokenizer(gguf), load_tokenizer(folder)
    assert tokenizer.chat_template == expected.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (expected.eos_token, expected.pad_token)
    ids = _chat_ids(expected)
    assert _chat_ids(tokenizer) == ids
    for text in ["hello <s> world", "\nno space before the first word"]:  # not chat-rendered
        assert tokenizer(text)["input_ids"] == expected(text)["input_ids"], text
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings  # every id has a row
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits
        want = reference(torch.tensor([ids])).logits
    assert (got - want).abs().max().item() < 1e-2  # f16 storage of the weights
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _scaled_llama_gguf(tmp_path: Path, tiny_model_dir: Path, rope: dict):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(  # head_dim 64: 32 frequencies
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384,
        rope_parameters=rope))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path, _ = export_gguf(tmp_path / "model", tmp_path / "out", verify=False)
    return model, path


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 2048}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, LINEAR_ROPE], ids=["llama3", "linear"])
def test_rope_scaling_is_read_back_from_the_file(tmp_path: Path, tiny_model_dir: Path,
                                                 rope: dict) -> None:
    # transformers' GGUF reader drops it for llama: without it the positions would differ.
    source, path = _scaled_llama_gguf(tmp_path, tiny_model_dir, rope)
    config = load_model_config(ModelConfig(name_or_path=str(path)))
    assert config.rope_parameters["rope_type"] == rope["rope_type"]
    assert config.rope_parameters["factor"] == pytest.approx(rope["factor"])
    model = load_model(ModelConfig(name_or_path=str(path)), attn_implementation="sdpa",
                       dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(),
                               source.model.rotary_emb.inv_freq.double(), rtol=1e-5, atol=0)
    ids = torch.arange(2, 40).unsqueeze(0) + 1000  # positions far apart in rotary terms
    with torch.no_grad():
        got = model(ids, position_ids=ids - 2 + 3000).logits
        want = source(ids, position_ids=ids - 2 + 3000).logits
    assert (got - want).abs().max().item() < 1e-2


def test_a_damaged_file_is_a_clear_error(tiny_gguf: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(tiny_gguf.read_bytes()[:4000])
    with pytest.raises(ConfigError, match=r"damaged\.gguf is not a readable GGUF file"):
        load_model_config(ModelConfig(name_or_path=str(damaged)))
    foreign = tmp_path / "foreign.gguf"
    foreign.write_text("not a gguf file at all")
    with pytest.raises(ConfigError, match="fetch the file again"):
        load_tokenizer(ModelConfig(name_or_path=str(foreign)))


def test_a_missing_file_names_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such GGUF file.*\.gguf file"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "model.gguf")),
                   attn_implementation="sdpa", dtype=torch.float32)
