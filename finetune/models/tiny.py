"""The built-in tiny model: a ~6.9M-parameter Llama with a real BPE tokenizer and chat template.

It is written once as an ordinary Hugging Face model folder (config.json, model.safetensors,
tokenizer files) and then loaded through the same code path as any real model. The weights
are a deterministic random initialisation, so every machine builds the same model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
# Bump when the architecture, init or tokenizer changes, so stale cached folders are not reused.
TINY_VERSION = "3"
TINY_SEED = 1234
TOKENIZER_FILE = Path(__file__).with_name("tiny_tokenizer.json")

# A small ChatML-like template. The {% generation %} markers let transformers return the
# assistant-token mask directly; EOS (<|end|>) closes every turn.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def default_cache_root() -> Path:
    """Where built-in assets are written: $FINETUNE_CACHE, else ~/.cache/finetune."""
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "finetune"


def build_tiny_tokenizer():
    """Return the tiny model's fast tokenizer (PreTrainedTokenizerFast) with its chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        bos_token="<|begin|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """The tiny Llama's architecture: GQA (8 query heads, 4 KV heads), head_dim 32."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=((vocab_size + 63) // 64) * 64,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=0.02,
    )


def ensure_tiny_model(cache_root: Path | None = None) -> Path:
    """Write the tiny model folder if it is not there yet and return its path.

    The folder is built in a temporary directory and renamed into place, so a crash or a
    concurrent process never leaves a half-written model behind.
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / f"tiny-llama-v{TINY_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the built-in tiny model in %s", target)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(rng_state)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
