"""Load a causal LM and its tokenizer: the built-in tiny model, a local folder, or a hub id.

All three go through `AutoModelForCausalLM` / `AutoTokenizer`; the tiny model is first written
as an ordinary Hugging Face folder. `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.config.schema import ModelConfig
from finetune.errors import ConfigError
from finetune.kernels.registry import ModelFacts
from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa
from finetune.kernels.varlen_torch import VARLEN_ATTN, register_varlen_attn
from finetune.models.gguf_input import (
    gguf_path,
    is_gguf,
    load_gguf_config,
    load_gguf_model,
    load_gguf_tokenizer,
)
from finetune.models.tiny import TINY_NAME, ensure_tiny_model

logger = logging.getLogger(__name__)


def resolve_model_path(cfg: ModelConfig) -> str:
    """Return a local folder, GGUF file or hub id for `cfg.name_or_path`; build the tiny model if
    asked.

    Raises ConfigError when a path-like value does not exist.
    """
    name = cfg.name_or_path
    if is_gguf(name):
        return str(gguf_path(name))
    if name == TINY_NAME:
        return str(ensure_tiny_model(Path(cfg.cache_dir) if cfg.cache_dir else None))
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise ConfigError(
                f"model.name_or_path={name}: no such model folder. Give a folder holding "
                "config.json and the weights (as written by save_pretrained), a hub id such as "
                "Qwen/Qwen2.5-0.5B-Instruct, or `tiny` for the built-in model.")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={name}: the folder has no config.json, so it is not a "
                "Hugging Face model folder. Point it at the folder save_pretrained wrote.")
        return str(path)
    return name


def _needs_remote_code(source: str) -> bool:
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    try:
        return "auto_map" in json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False


def _hub_error(name: str, exc: Exception, source: str | None = None) -> ConfigError:
    if "trust_remote_code" in str(exc) or (source and _needs_remote_code(source)):
        return ConfigError(
            f"model.name_or_path={name}: this model's code ships with the model (its config "
            "has an auto_map), and running it is off by default. If you trust the model's "
            "author, add model.trust_remote_code=true: that lets the Python files in the model "
            "folder or hub repo run on this machine with your permissions.")
    return ConfigError(
        f"model.name_or_path={name}: could not load it ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). If it is a hub id, this machine may "
        "not reach the hub: download it elsewhere with `huggingface-cli download` and pass the "
        "local folder instead; if it is a local folder, check the path.")


def load_model_config(cfg: ModelConfig):
    """The transformers config of the model (no weights loaded)."""
    from transformers import AutoConfig

    if is_gguf(cfg.name_or_path):
        return load_gguf_config(cfg.name_or_path)
    source = resolve_model_path(cfg)
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(cfg.name_or_path, exc, source) from None


def model_facts(hf_config) -> ModelFacts:
    """The attention shape the kernel plan checks candidates against, from a transformers config."""
    heads = hf_config.num_attention_heads
    return ModelFacts(
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
    )


def context_length(hf_config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), if it says."""
    value = getattr(hf_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def load_tokenizer(cfg: ModelConfig):
    """Load the model's tokenizer; give it a pad token (EOS) if it has none."""
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg)
    try:
        tokenizer = (load_gguf_tokenizer(cfg.name_or_path) if is_gguf(cfg.name_or_path) else
                     AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                   trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError) as exc:
        raise _hub_error(cfg.name_or_path, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: padding with its EOS token %r (padded "
                    "positions are masked out of attention and loss)", tokenizer.eos_token)
    return tokenizer


def _damaged_weights(source: str) -> list[str]:
    """The weight files in a local model folder whose safetensors header does not read."""
    from safetensors import safe_open

    damaged = []
    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # any failure to open is a damaged file here
            damaged.append(path.name)
    return damaged


def load_model(cfg: ModelConfig, *, attn_implementation: str, dtype, quantization=None,
               empty: bool = False):
    """Load the causal LM with the plan's attention implementation and weight dtype.

    `quantization` is a transformers quantization config (QLoRA's 4-bit NF4:
    finetune.adapters.qlora.quantization_config); the quantized layers are then placed on the
    current accelerator (or the CPU) as they load, the other weights kept in `dtype`.
    `empty`: build the model from its config on the meta device, without reading the weights
    (an FSDP2 rank other than 0, which receives its shards from rank 0 once sharded).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if attn_implementation == VARLEN_SDPA:
        register_varlen_sdpa()
    if attn_implementation == VARLEN_ATTN:
        register_varlen_attn()
    if empty:
        return _empty_model(cfg, attn_implementation=attn_implementation, dtype=dtype)
    if is_gguf(cfg.name_or_path):
        return load_gguf_model(cfg.name_or_path, attn_implementation=attn_implementation,
                               dtype=dtype, quantization=quantization)
    source = resolve_model_path(cfg)
    extra = {"quantization_config": quantization} if quantization is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=attn_implementation, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise _hub_error(cfg.name_or_path, exc, source) from None
    except Exception as exc:
        damaged = _damaged_weights(source) if Path(source).is_dir() else []
        if not damaged:
            raise
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path}: weight file {', '.join(damaged)} is damaged "
            f"or incomplete ({type(exc).__name__}: {str(exc).splitlines()[0]}). An interrupted "
            "download leaves such files: download the model again.") from None
    logger.info("loaded %s (%s, %s%s, attention=%s)", cfg.name_or_path, type(model).__name__,
                dtype, ", 4-bit NF4 linear layers" if quantization is not None else "",
                model.config._attn_implementation)
    return model


def _empty_model(cfg: ModelConfig, *, attn_implementation: str, dtype):
    """The model's modules, parameters and buffers on the meta device: shapes and dtypes as
    `from_pretrained` would give them, no storage (`from_pretrained` also leaves the model in
    eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    logger.info("built %s on the meta device (%s, attention=%s): its weights come from rank 0",
                type(model).__name__, dtype, model.config._attn_implementation)
    return model
