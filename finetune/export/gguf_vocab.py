"""A Hugging Face fast tokenizer as GGUF tokenizer metadata (llama.cpp's `tokenizer.ggml.*` keys).

Two BPE families are written, told apart by the tokenizer's own pre-tokenizer:

- byte-level BPE (GPT-2 alphabet: Llama 3, Qwen2/2.5) -> `tokenizer.ggml.model = gpt2`, with the
  merges and a pre-tokenizer name llama.cpp knows (`llama-bpe`, `qwen2`, `gpt-2`), recognised
  from the split regex the tokenizer uses;
- sentencepiece-style BPE with byte fallback (`▁` for spaces: Llama 2, Mistral, the built-in tiny
  model) -> `tokenizer.ggml.model = llama`, with scores that rank merged tokens in merge order
  (llama.cpp's SPM tokenizer merges the best-scored pair first) and the merges as well.

Anything else is refused with ConfigError: a tokenizer written under the wrong family tokenises
differently in llama.cpp, which is the failure this export exists to prevent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from finetune.errors import ConfigError

# The split regexes of the byte-level tokenizers llama.cpp names (its `tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "</s>")

# llama.cpp's token types (gguf.TokenType), spelled here so this module imports without gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6


def turn_ends(tokenizer, chat_template: str | None) -> list[str]:
    """The known end-of-turn tokens (END_OF_TURN) a conversation rendered through
    `chat_template` contains, in that order; none without a template or when it cannot render."""
    if not chat_template:
        return []
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                             tokenize=False)
    except Exception:  # a template with stricter rules (roles, system turn): no end tokens known
        return []
    return [token for token in END_OF_TURN if token in text]


@dataclass
class GGUFVocab:
    """What the writer stores: one entry per embedding row (`tokens`, `token_types`, `scores`),
    the merges as "a b" strings, the tokenizer family and pre-tokenizer name, special ids."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_space_prefix: bool = False


def _steps(component: dict | None) -> list[dict]:
    """A pre-tokenizer/normalizer and, for a Sequence, its parts, flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in component else "normalizers"
        return [step for part in component.get(key, []) for step in _steps(part)]
    return [component]


def _family(spec: dict) -> tuple[str, str, bool]:
    """(ggml model, pre-tokenizer name, add_space_prefix) for a tokenizer.json dict."""
    pre_steps = _steps(spec.get("pre_tokenizer"))
    kinds = {step.get("type") for step in pre_steps}
    if "ByteLevel" in kinds:
        splits = [step["pattern"].get("Regex") for step in pre_steps if step.get("type") == "Split"]
        if not splits:
            return "gpt2", "gpt-2", False
        if len(splits) == 1 and splits[0] in BYTE_LEVEL_PRE:
            return "gpt2", BYTE_LEVEL_PRE[splits[0]], False
        raise ConfigError(
            f"the tokenizer's byte-level split regex {splits!r} is not one llama.cpp knows by name "
            f"(supported: Llama 3 -> llama-bpe, Qwen2 -> qwen2, plain GPT-2); llama.cpp would "
            "tokenise text differently from training. Export a model with one of these tokenizers.")
    metaspace = [step for step in pre_steps if step.get("type") == "Metaspace"]
    normalizers = _steps(spec.get("normalizer"))
    if metaspace or any(step.get("type") == "Prepend" for step in normalizers):
        prepend = (metaspace[0].get("prepend_scheme", "always") != "never" if metaspace
                   else any(step.get("type") == "Prepend" for step in normalizers))
        return "llama", "default", prepend
    raise ConfigError(
        f"the tokenizer's pre-tokenizer ({sorted(k for k in kinds if k) or 'none'}) is neither "
        "byte-level BPE (Llama 3, Qwen2) nor sentencepiece-style BPE (Llama 2, Mistral); a GGUF "
        "file cannot describe it for llama.cpp.")


def build_vocab(tokenizer, n_rows: int, chat_template: str | None = None) -> GGUFVocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer, padded to the model's `n_rows`
    embedding rows (llama.cpp needs one token per row; the filler tokens are UNUSED), with the
    end-of-turn token `chat_template` writes.

    ConfigError (exit code 2): not a fast BPE tokenizer, a family llama.cpp cannot reproduce,
    or more tokens than embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("the model's tokenizer is not a fast (tokenizer.json) tokenizer; GGUF "
                          "export needs its vocabulary and merges.")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ConfigError(f"the model's tokenizer is {bpe.get('type')}, not BPE; GGUF export "
                          "supports BPE tokenizers (Llama, Qwen2, Mistral).")
    ggml_model, pre, add_space_prefix = _family(spec)
    vocab: dict[str, int] = dict(bpe["vocab"])
    added = {tok["id"]: tok for tok in spec.get("added_tokens", [])}
    for token_id, tok in added.items():
        vocab.setdefault(tok["content"], token_id)
    size = max(vocab.values()) + 1
    if size > n_rows:
        raise ConfigError(f"the tokenizer has {size} tokens but the model's embedding has only "
                          f"{n_rows} rows; resize the embedding before exporting.")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [UNUSED] * n_rows
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    scores = [0.0] * n_rows
    if ggml_model == "llama":
        for rank, merge in enumerate(merges):
            merged = vocab.get(merge.replace(" ", ""))
            if merged is not None and scores[merged] == 0.0:
                scores[merged] = -float(rank + 1)
        for token_id, text in enumerate(tokens):
            if _BYTE_TOKEN.match(text):
                types[token_id] = BYTE
    for token_id, tok in added.items():
        types[token_id] = CONTROL if tok.get("special") else USER_DEFINED
    special_ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad",
                                                                            "unk")}
    # llama.cpp ends a chat turn at the end-of-turn token (it may differ from EOS, as Llama 3's
    # <|eot_id|> does): the first known one the chat template writes.
    ends = turn_ends(tokenizer, chat_template)
    special_ids["eot"] = vocab.get(ends[0]) if ends else None
    # Whether plain text gets BOS, as the tokenizer itself does it (its post-processor).
    first = tokenizer("a")["input_ids"][:1]
    add_bos = special_ids["bos"] is not None and first == [special_ids["bos"]]
    return GGUFVocab(ggml_model, pre, tokens, types, scores, merges,
                     {k: v for k, v in special_ids.items() if v is not None}, add_bos,
                     add_space_prefix)


def write_vocab(writer, vocab: GGUFVocab, chat_template: str | None) -> None:
    """Store `vocab` and the chat template through a gguf.GGUFWriter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.model == "llama":
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id,
              "eot": writer.add_eot_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
