"""Model loading: path resolution and its errors, model facts, the tokenizer's chat template,
the plan's attention/dtype, and trust_remote_code staying off."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.errors import ConfigError
from finetune.models import (
    load_model,
    load_model_config,
    load_tokenizer,
    model_facts,
    resolve_model_path,
)

# ---------------------------------------------------------------- resolve_model_path


@pytest.mark.parametrize("name", ["{tmp}/absent-model", "./absent-model", "~/absent-model",
                                  "org/sub/absent-model"])
def test_missing_folder_is_a_config_error_naming_it(model_cfg, tmp_path: Path, name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything path-like (absolute, ./, ~, or more than one slash) must exist; not a hub id."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    name = name.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=re.escape(name)) as info:
        resolve_model_path(model_cfg(name))
    assert info.value.exit_code == 2 and "no such model folder" in str(info.value)


def test_folder_without_config_json_is_refused(model_cfg, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(model_cfg(tmp_path))


def test_hub_id_is_passed_through_and_tilde_is_expanded(model_cfg, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(model_cfg("Qwen/Qwen2.5-0.5B-Instruct")) == \
        "Qwen/Qwen2.5-0.5B-Instruct"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models/m").mkdir(parents=True)
    (tmp_path / "models/m/config.json").write_text("{}")
    assert resolve_model_path(model_cfg("~/models/m")) == str(tmp_path / "models/m")


def test_tiny_resolves_into_the_configured_cache(model_cfg, tiny_model_dir: Path) -> None:
    cfg = model_cfg("tiny", cache_dir=str(tiny_model_dir.parent))
    assert resolve_model_path(cfg) == str(tiny_model_dir)


def test_unreachable_hub_id_is_a_config_error_not_a_traceback(model_cfg) -> None:
    """HF_HUB_OFFLINE=1 (tests/conftest.py) makes the hub unreachable, as on a closed cluster."""
    with pytest.raises(ConfigError, match="no-such-org/no-such-model.*huggingface-cli download"):
        load_model_config(model_cfg("no-such-org/no-such-model"))


# ---------------------------------------------------------------- model_facts


def test_model_facts_of_the_tiny_model(model_cfg, tiny_model_dir: Path) -> None:
    facts = model_facts(load_model_config(model_cfg(tiny_model_dir)))
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim) == (8, 4, 32)


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, (12, 12, 64)),  # no GQA fields (GPT-2 style): MHA, head_dim from hidden size
    ({"num_key_value_heads": None, "head_dim": None}, (12, 12, 64)),
    ({"num_key_value_heads": 4, "head_dim": 128}, (12, 4, 128)),  # head_dim != hidden/heads
])
def test_model_facts_fallbacks(extra: dict, expected: tuple[int, int, int]) -> None:
    facts = model_facts(SimpleNamespace(num_attention_heads=12, hidden_size=768, **extra))
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim) == expected


# ---------------------------------------------------------------- tokenizer

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def tiny_tokenizer(model_cfg, tiny_model_dir: Path):
    return load_tokenizer(model_cfg(tiny_model_dir))


def test_chat_template_renders_exactly(tiny_tokenizer) -> None:
    assert tiny_tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|begin|><|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n")
    prompt = tiny_tokenizer.apply_chat_template(CHAT[:2], tokenize=False,
                                                add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")


def test_chat_template_marks_only_the_assistant_reply(tiny_tokenizer) -> None:
    out = tiny_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tiny_tokenizer.decode(kept) == "Hello!<|end|>"


def test_chat_template_rejects_an_unknown_role(tiny_tokenizer) -> None:
    with pytest.raises(Exception, match="unknown role: tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("text", [
    "héllo wörld — ñ 你好 🙂", "  two  spaces\n\ttab\n\n", "x = 3.14159 * 2", " leading",
    "trailing ", "<|user|>\nliteral special tokens<|end|>\n",
])
def test_encode_decode_round_trips(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_rendered_chat_round_trips_with_one_bos(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert ids.count(tiny_tokenizer.bos_token_id) == 1  # encoding adds no second BOS


def test_tokenizer_keeps_its_pad_token(tiny_tokenizer) -> None:
    assert tiny_tokenizer.pad_token == "<|pad|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_tokenizer_without_pad_gets_eos_and_says_so(model_cfg, tiny_copy, caplog) -> None:
    folder = tiny_copy("no-pad", tokenizer_config={"pad_token": None})
    with caplog.at_level("INFO", logger="finetune.models.load"):
        tokenizer = load_tokenizer(model_cfg(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end|>"
    assert "no pad token" in caplog.text and "<|end|>" in caplog.text


# ---------------------------------------------------------------- load_model


@pytest.mark.parametrize(("attention", "dtype"), [("eager", torch.bfloat16),
                                                  ("sdpa", torch.float32)])
def test_model_loads_with_the_plans_attention_and_dtype(model_cfg, tiny_model_dir: Path,
                                                        attention: str, dtype) -> None:
    model = load_model(model_cfg(tiny_model_dir), attn_implementation=attention, dtype=dtype)
    assert model.config._attn_implementation == attention
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_missing_model_folder_fails_before_any_load(model_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "gone"))):
        load_model(model_cfg(tmp_path / "gone"), attn_implementation="sdpa",
                   dtype=torch.float32)


# ---------------------------------------------------------------- remote code


def _remote_code_folder(tiny_copy, model_type: str) -> tuple[Path, Path]:
    """A tiny copy whose config.json asks for the folder's own code; importing it leaves a mark."""
    folder = tiny_copy(f"remote-{model_type}", config={
        "model_type": model_type,
        "auto_map": {"AutoConfig": "configuration_x.XConfig",
                     "AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    marker = folder.parent / f"{model_type}-code-ran"
    for module in ("configuration_x", "modeling_x"):
        (folder / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code ran')\n")
    return folder, marker


@pytest.mark.parametrize("model_type", ["llama", "x_custom_llama"])
def test_remote_code_never_runs_with_trust_remote_code_off(model_cfg, tiny_copy,
                                                           model_type: str) -> None:
    """A known model_type loads with the built-in class; an unknown one is a ConfigError.
    Either way the folder's Python files are never imported."""
    folder, marker = _remote_code_folder(tiny_copy, model_type)
    cfg = model_cfg(folder)
    assert cfg.trust_remote_code is False  # the default
    for load in (load_model_config,
                 lambda c: load_model(c, attn_implementation="sdpa", dtype=torch.float32)):
        try:
            loaded = load(cfg)
        except ConfigError:
            assert model_type != "llama"
        else:
            assert model_type == "llama" and "Llama" in type(loaded).__name__
    assert not marker.exists()


def test_remote_code_error_names_the_trust_remote_code_fix(model_cfg, tiny_copy) -> None:
    folder, _ = _remote_code_folder(tiny_copy, "x_custom_llama")
    with pytest.raises(ConfigError) as info:
        load_model_config(model_cfg(folder))
    message = str(info.value)
    assert "model.trust_remote_code" in message and str(folder) in message
    assert "huggingface-cli download" not in message
