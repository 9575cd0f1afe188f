"""GGUF as input: `model.name_or_path=path/to/model.gguf` fine-tunes a model held only as GGUF.

transformers reads the file (`from_pretrained(folder, gguf_file=name)`): it dequantises every
tensor to the plan's dtype and builds the tokenizer and chat template from the file's metadata.
Its reader drops rope scaling for the Llama, Mistral and Qwen2 architectures (it maps only
`rope.freq_base`), so this module puts it back from the file:
- a linear factor (`{arch}.rope.scaling.factor`) becomes `rope_type=linear`;
- Llama 3.1's per-frequency factors (the `rope_freqs` tensor llama.cpp's converter writes)
  become `rope_type=llama3`, with its parameters fitted to the factors and then checked: the
  config's frequencies must equal the file's, else the file is refused.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from finetune.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# llama3 rope: only ratios of its three lengths are fixed by the frequencies, so the original
# context is set to Llama 3's own (meta-llama/Llama-3.1-8B config.json) and the factors follow.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_FREQ_RTOL = 1e-5


def is_gguf(name: str) -> bool:
    """Whether `model.name_or_path` names a GGUF file."""
    return name.lower().endswith(GGUF_SUFFIX)


def gguf_path(name: str) -> Path:
    """The GGUF file `name` names; ConfigError when it is missing or the gguf package is."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path={name}: no such GGUF file. Give the path of a .gguf file, a "
            "Hugging Face model folder, a hub id, or `tiny` for the built-in model.")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ConfigError(
            f"model.name_or_path={name}: reading GGUF needs the gguf package, which is not "
            "installed. Install it with: pip install 'finetune[gguf]'") from None
    return path


def _reader(path: Path, name: str):
    """gguf's reader of `path`; ConfigError naming the file when it does not parse."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # any parse failure is a damaged or foreign file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"model.name_or_path={name}: {path.name} is not a readable GGUF file "
            f"({type(exc).__name__}: {first}). An interrupted download or copy leaves such "
            "files: fetch the file again, and check its size against the source's.") from None


def _field(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def _file_inv_freq(reader, arch: str):
    """(base frequencies, frequencies a llama.cpp reader uses, linear factor or None, per-
    frequency factors or None), from the file's rope metadata and rope_freqs tensor."""
    import numpy as np

    from finetune.export.gguf import base_inv_freq

    theta = float(_field(reader, f"{arch}.rope.freq_base") or 10000.0)
    dim = _field(reader, f"{arch}.rope.dimension_count")
    if dim is None:
        heads = _field(reader, f"{arch}.attention.head_count")
        dim = _field(reader, f"{arch}.embedding_length") // heads
    base = base_inv_freq(theta, int(dim))
    linear = _field(reader, f"{arch}.rope.scaling.factor")
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise ConfigError(f"rope scaling {kind!r} in a GGUF file is not read (supported: none, "
                          "linear, and Llama 3.1's per-frequency factors).")
    factors = next((np.asarray(t.data, dtype=np.float64) for t in reader.tensors
                    if t.name == "rope_freqs.weight"), None)
    inv = base / float(linear) if linear else base.copy()
    if factors is not None:
        inv = inv / factors
    return base, inv, (float(linear) if linear else None), factors


def _llama3_parameters(base, factors) -> dict | None:
    """llama3 rope parameters that give `factors` per frequency, or None when they cannot be
    fitted (fewer than two frequencies between the unscaled and fully scaled bands).

    In the smoothed band 1/r = 1/factor + s (1 - 1/factor) with s = (orig/wavelen - low) /
    (high - low): s is linear in 1/wavelen, so two points fix orig/(high-low) and
    low/(high-low)."""
    import numpy as np

    factor = float(factors.max())
    if factor <= 1.0:
        return None
    inside = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if inside.sum() < 2:
        return None
    x = base[inside] / (2 * math.pi)  # 1 / wavelength
    s = (1.0 / factors[inside] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(x, s, 1)
    span = _LLAMA3_ORIGINAL_CONTEXT / slope  # high - low
    low = -intercept * span
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(low + span),
            "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT}


def _set_rope(config, scaling: dict, theta: float) -> None:
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = {**scaling, "rope_theta": theta}
    else:  # transformers < 5
        config.rope_scaling = dict(scaling)


def _config_inv_freq(config):
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    inv, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    return np.asarray(inv.double().numpy())


def load_gguf_config(name: str):
    """The transformers config of the GGUF file `name`, with the file's rope scaling."""
    path = gguf_path(name)
    return _config(path, name, _reader(path, name))


def _config(path: Path, name: str, reader):
    import numpy as np
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"model.name_or_path={name}: transformers cannot build a model from this GGUF file "
            f"({type(exc).__name__}: {first}). Its architecture is "
            f"{_field(reader, 'general.architecture')!r}; fine-tune from the model's Hugging Face "
            "folder instead.") from None
    arch = _field(reader, "general.architecture")
    base, file_inv, linear, factors = _file_inv_freq(reader, arch)
    theta = float(_field(reader, f"{arch}.rope.freq_base") or 10000.0)
    if factors is not None:
        params = None if linear else _llama3_parameters(base, factors)
        if params is None:
            raise ConfigError(
                f"model.name_or_path={name}: the file's per-frequency rope factors "
                "(rope_freqs) do not fit Llama 3.1's scaled rope, so the model would run with "
                "other positions than llama.cpp gives it. Fine-tune from the model's Hugging "
                "Face folder instead.")
        _set_rope(config, params, theta)
    elif linear:
        _set_rope(config, {"rope_type": "linear", "factor": linear}, theta)
    if factors is not None or linear:
        got = _config_inv_freq(config)
        if not np.allclose(got, file_inv, rtol=_FREQ_RTOL, atol=0):
            raise ConfigError(
                f"model.name_or_path={name}: the file's rope scaling could not be reproduced "
                f"(largest relative difference {np.max(np.abs(got / file_inv - 1)):.2e}). "
                "Fine-tune from the model's Hugging Face folder instead.")
    return config


def load_gguf_tokenizer(name: str):
    """The tokenizer and chat template stored in the GGUF file `name`."""
    from transformers import AutoTokenizer

    path = gguf_path(name)
    reader = _reader(path, name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _as_the_file_says(tokenizer, _field(reader, "tokenizer.ggml.tokens"),
                             _field(reader, "tokenizer.ggml.add_space_prefix"))


def _as_the_file_says(tokenizer, tokens: list | None, add_space_prefix: bool | None):
    """`tokenizer` as the file describes it, where transformers' reader departs from it:
    - the added tokens it appends past the file's tokens (its class defaults <s>, </s>, <unk>
      where the file names other special tokens) are dropped: the model has no embedding row
      for them, so text holding "<s>" would index past the table;
    - a sentencepiece-style tokenizer whose file says add_space_prefix=false gets no space
      before the first word (the reader always adds one), as llama.cpp reads it."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    size = len(tokens) if tokens is not None else len(tokenizer)
    dropped = [t["content"] for t in spec["added_tokens"] if t["id"] >= size]
    pre = spec.get("pre_tokenizer") or {}
    prefix = (add_space_prefix is False and pre.get("type") == "Metaspace"
              and pre.get("prepend_scheme") != "never")
    if not dropped and not prefix:
        return tokenizer
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    if prefix:
        pre["prepend_scheme"] = "never"
        decoder = spec.get("decoder") or {}
        decoder["decoders"] = [d for d in decoder.get("decoders", [])
                               if not (d.get("type") == "Strip" and d.get("start") == 1)]
    special = {key: value for key in ("bos_token", "eos_token", "unk_token", "pad_token")
               if isinstance(value := getattr(tokenizer, key, None), str)
               and value not in dropped}
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      **special)
    rebuilt.chat_template = tokenizer.chat_template
    if dropped:
        logger.info("GGUF tokenizer: dropped %s, which transformers' reader adds past the "
                    "file's %d tokens", ", ".join(dropped), size)
    return rebuilt


def load_gguf_model(name: str, *, attn_implementation: str, dtype, quantization=None):
    """The causal LM in the GGUF file `name`, dequantised to `dtype`."""
    from transformers import AutoModelForCausalLM

    path = gguf_path(name)
    reader = _reader(path, name)
    config = _config(path, name, reader)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    extra = {"quantization_config": quantization} if quantization is not None else {}
    logger.info("reading GGUF file %s through transformers: its %s tensors are dequantised to "
                "%s; the tokenizer and chat template come from the file", path, "/".join(types),
                dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=config, dtype=dtype,
            attn_implementation=attn_implementation, **extra)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"model.name_or_path={name}: transformers could not read the weights of this GGUF "
            f"file ({type(exc).__name__}: {first}). Fine-tune from the model's Hugging Face "
            "folder instead, or fetch the file again if it may be damaged.") from None
    # transformers names the folder; the adapter's base_model_name_or_path must name the file.
    model.config.name_or_path = model.name_or_path = str(path)
    return model
