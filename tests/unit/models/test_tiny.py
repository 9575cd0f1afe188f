"""The built-in tiny model: byte-identical on every build, the documented shape, a tokenizer
whose special tokens are single ids."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from finetune.models.tiny import build_tiny_tokenizer, ensure_tiny_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two builds into fresh cache roots, with the caller's RNG seeded before the first."""
    root = tmp_path_factory.mktemp("tiny-builds")
    torch.manual_seed(7)
    first = ensure_tiny_model(root / "a")
    draw_after_build = torch.rand(4)
    second = ensure_tiny_model(root / "b")
    torch.manual_seed(7)
    return {"root_a": root / "a", "first": first, "second": second,
            "draw_after_build": draw_after_build, "draw_untouched": torch.rand(4)}


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "tokenizer_config.json"])
def test_builds_are_byte_identical(two_builds: dict, tiny_model_dir: Path, name: str) -> None:
    first, second = two_builds["first"], two_builds["second"]
    assert first != second
    assert _sha256(first / name) == _sha256(second / name) == _sha256(tiny_model_dir / name)


def test_build_leaves_the_callers_rng_alone(two_builds: dict) -> None:
    assert torch.equal(two_builds["draw_after_build"], two_builds["draw_untouched"])


def test_a_built_folder_is_reused_and_no_temporary_folder_is_left(two_builds: dict) -> None:
    root, first = two_builds["root_a"], two_builds["first"]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(root) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert list(root.iterdir()) == [first]


def test_documented_shape(tiny_model_dir: Path) -> None:
    """GQA with 8 query heads over 4 KV heads, head_dim 32 (tiny.py's tiny_config)."""
    cfg = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"] == 32
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"]) == (6, 1024)
    assert cfg["tie_word_embeddings"] is False
    vocab = len(build_tiny_tokenizer())
    assert cfg["vocab_size"] % 64 == 0 and 0 <= cfg["vocab_size"] - vocab < 64


def test_special_tokens_are_single_ids_that_match_the_config(tiny_model_dir: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    cfg = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    specials = ["<|begin|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in specials]
    assert all(len(one) == 1 for one in ids)
    assert len({one[0] for one in ids}) == len(specials)
