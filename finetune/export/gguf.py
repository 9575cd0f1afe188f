"""Write a Hugging Face causal LM (Llama, Qwen2, Mistral) as one GGUF file for llama.cpp/Ollama.

The weights go under llama.cpp's tensor names (gguf.get_tensor_name_map), with the hyperparameters
llama.cpp reads for the architecture and the tokenizer and chat template (gguf_vocab). Storage:
`f16` or `bf16` for matrices (norms and biases stay f32, as llama.cpp keeps them), or `q8_0`
(gguf.quants; a matrix whose rows are not a multiple of the 32-value block stays f16).

Rotary layout: Hugging Face stores q_proj/k_proj rows per head as [first halves | second halves]
("rotate_half"); llama.cpp's `llama` architecture rotates interleaved pairs, so those rows are
permuted per head into pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...). Qwen2 runs NeoX-style rotary in
llama.cpp and is stored as is. Mistral is written as the `llama` architecture, as llama.cpp does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from finetune.errors import ConfigError
from finetune.export.gguf_vocab import build_vocab, write_vocab

logger = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0")
# transformers model_type -> the GGUF architecture llama.cpp runs it as.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# The rope scalings written: linear as metadata, Llama 3.1's as llama.cpp's per-frequency factors
# (the rope_freqs tensor).
_ROPE_SCALING = {"linear", "llama3"}


def gguf_architecture(config) -> str:
    """The GGUF architecture for a transformers config; ConfigError (exit code 2) naming the
    supported ones otherwise."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"GGUF export supports the architectures {supported}; this model is "
                          f"{config.model_type!r} ({', '.join(config.architectures or [])}).")
    return arch


def rope_scaling(config) -> dict | None:
    """The model's rope scaling (rope_type and its parameters), None without one."""
    return _rope(config)[1]


def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, rope scaling or None) from a transformers config, old or new layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or params
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in _ROPE_SCALING:
        raise ConfigError(f"rope scaling {kind!r} is not exported to GGUF (supported: none, "
                          f"{', '.join(sorted(_ROPE_SCALING))}).")
    return float(theta), dict(scaling, rope_type=kind)


def base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled rotary frequencies, one per pair of dimensions."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_factors(model, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for a Llama 3.1-style scaled rope: how much each frequency is
    divided by, read off the model's own scaled frequencies (rotary_emb.inv_freq)."""
    theta, _ = _rope(model.config)
    scaled = model.model.rotary_emb.inv_freq.detach().to("cpu").double().numpy()
    return (base_inv_freq(theta, head_dim) / scaled).astype(np.float32)


def interleave_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q_proj/k_proj (or their bias) from Hugging Face's rotate_half order to llama.cpp's
    interleaved order, per head; transformers' GGUF loader applies the inverse."""
    half = weight.shape[0] // n_heads // 2
    return (weight.reshape(n_heads, 2, half, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_hparams(writer, config, head_dim: int) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None)
                                 or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling is not None and scaling["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(int(config.vocab_size))


def _stored(name: str, array: np.ndarray, quant: str):
    """(data, raw dtype or None) for one tensor in the requested storage."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if array.ndim == 1:
        return array.astype(np.float32), None
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    if quant == "bf16":
        return gguf.quants.quantize(array, Q.BF16), Q.BF16
    if quant == "q8_0":
        logger.info("%s: rows of %d values are not whole q8_0 blocks; stored as f16", name,
                    array.shape[-1])
    return array.astype(np.float16), None


def write_gguf(model, tokenizer, path: Path, *, quant: str = "f16", name: str = "model",
               chat_template: str | None = None) -> None:
    """Write `model` (a transformers Llama/Qwen2/Mistral causal LM, merged, any dtype) and its
    `tokenizer` to `path` as GGUF. ConfigError (exit code 2) for an unsupported architecture,
    rope scaling (linear and Llama 3.1's llama3 are written), tokenizer or `quant`."""
    import gguf

    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: choose one of {', '.join(QUANTS)}.")
    config = model.config
    arch = gguf_architecture(config)
    head_dim = int(getattr(config, "head_dim", None)
                   or config.hidden_size // config.num_attention_heads)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    state = model.state_dict()
    n_rows = int(state["model.embed_tokens.weight"].shape[0])
    vocab = build_vocab(tokenizer, n_rows, chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    window = getattr(config, "sliding_window", None)
    if arch == "llama" and window and window < config.max_position_embeddings:
        logger.warning("the model attends within a sliding window of %d tokens; llama.cpp's "
                       "llama architecture attends to the whole context, so beyond %d tokens "
                       "it computes differently", window, window)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _write_hparams(writer, config, head_dim)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    write_vocab(writer, vocab, chat_template)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"the weight {hf_name} has no llama.cpp tensor name for the "
                              f"{arch} architecture; this model cannot be exported to GGUF.")
        array = tensor.detach().to("cpu").float().numpy()
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            array = interleave_rotary(array, n_heads if ".attn_q." in gguf_name else n_kv)
        data, raw_dtype = _stored(gguf_name, array, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    if (rope_scaling(config) or {}).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          rope_factors(model, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str, tokenizer, chat_template: str | None) -> str:
    """An Ollama Modelfile for `gguf_name` beside it: FROM, and a stop parameter for the EOS
    token and each known end-of-turn token the chat template writes."""
    from finetune.export.gguf_vocab import turn_ends

    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [token for token in turn_ends(tokenizer, chat_template) if token not in stops]
    lines = [f"FROM ./{gguf_name}"]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
