"""Fixtures for the adapter tests: fresh tiny base models, peft configs, and the tiny model's
linear-layer shapes computed from its config.json (not from the modules peft wraps)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass(frozen=True)
class TinyShapes:
    """The tiny model's sizes as config.json states them."""

    layers: int
    hidden: int
    vocab: int
    linears: dict[str, tuple[int, int]]  # projection name -> (in_features, out_features)


@pytest.fixture(scope="session")
def tiny_shapes(tiny_model_dir: Path) -> TinyShapes:
    cfg = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    return TinyShapes(
        layers=cfg["num_hidden_layers"], hidden=hidden, vocab=cfg["vocab_size"],
        linears={"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out),
                 "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
                 "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                 "down_proj": (inter, hidden)})


@pytest.fixture(scope="session")
def load_base(tiny_model_dir: Path) -> Callable[..., torch.nn.Module]:
    """load_base(dtype=torch.float32): a fresh tiny base model, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    def load(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)

    return load


@pytest.fixture(scope="session")
def peft_cfg() -> Callable[..., object]:
    """peft_cfg(**fields): the `peft` group as a run gets it (OmegaConf-checked, Enum members)."""
    from omegaconf import OmegaConf

    from finetune.config.schema import PeftConfig

    return lambda **fields: OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(PeftConfig), fields))
