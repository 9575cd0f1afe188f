"""The speed benchmark's workload: the model, the data, the shared settings and the token count.

scripts/bench.py builds these once per benchmark run in a temporary folder; every side it then
launches (bench_ours.py, bench_reference.py, bench_trl.py) reads the same settings.json.

- The model is a Llama-architecture Hugging Face folder with random weights and the built-in tiny
  tokenizer: `small` is the built-in tiny model's shape (~6.9M parameters), `medium` ~30M; or
  the user's own model folder (`--model DIR`: the workdir's model/ links to it).
- The data is chat rows (OpenAI `messages`) of random tokenizer words whose prompt and answer
  lengths are lognormal, so lengths have the long tail of real instruction data (alpaca, chat);
  or the rows of the user's own file (`--data FILE`, any supervised format finetune reads,
  written out as chat rows so that every side reads the same conversations).
- Real tokens are counted by one rule for every side (`real_tokens`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

SEED = 1234
# Fraction of max_seq_len that a median prompt and a median answer take (in words, ~1 token each).
PROMPT_MEDIAN, ANSWER_MEDIAN = 0.07, 0.25
PROMPT_SIGMA, ANSWER_SIGMA = 0.8, 0.8


@dataclass(frozen=True)
class ModelShape:
    """A Llama decoder's size. `vocab` None: the tiny tokenizer's vocabulary; a larger one
    keeps the embedding and LM head of the real model (the tokenizer uses its first ids)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int | None = None
    rope_theta: float = 10000.0


SIZES: dict[str, ModelShape] = {
    "small": ModelShape(hidden=256, intermediate=1024, layers=6, heads=8, kv_heads=4),
    "medium": ModelShape(hidden=512, intermediate=1792, layers=8, heads=8, kv_heads=4),
    # Llama-3's vocabulary and proportions (intermediate 3.5x hidden, 4 query heads per kv
    # head, rope theta) at a width two CPU cores train: the LM head and loss hold most memory.
    "llama3_head": ModelShape(hidden=256, intermediate=896, layers=2, heads=8, kv_heads=2,
                              vocab=128256, rope_theta=500000.0),
    # meta-llama/Meta-Llama-3-8B's config.json.
    "llama3_8b": ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                            vocab=128256, rope_theta=500000.0),
}


class WorkloadError(ValueError):
    """The user's model folder or data file cannot be benchmarked; the message says why and
    what to do."""


@dataclass(frozen=True)
class Settings:
    """What every side trains with. `precision` is `plan` (the kernel plan's choice), `bf16` or
    `fp32`; `timing_warmup` optimizer steps are left out of the tokens/s. `model` and `data`
    (absolute paths, None: built here) are the user's model folder and data file; `size` and
    `rows` then only name the preset. `gradient_checkpointing` is set alike on every side."""

    size: str = "medium"
    max_seq_len: int = 512
    micro_batch_size: int = 8
    steps: int = 20
    timing_warmup: int = 3
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 42
    precision: str = "plan"
    rows: int = 2000
    model: str | None = None
    data: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.precision not in ("plan", "bf16", "fp32"):
            raise ValueError(f"precision must be plan, bf16 or fp32, got {self.precision!r}")
        if not 1 <= self.timing_warmup <= self.steps - 2:
            raise ValueError(f"timing_warmup={self.timing_warmup} must be at least 1 and leave "
                             f"two timed steps of steps={self.steps}")
        if min(self.max_seq_len, self.micro_batch_size, self.rows, self.lora_r) < 1:
            raise ValueError("max_seq_len, micro_batch_size, rows and lora_r must be positive")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def ours_overrides(settings: Settings, *, model_dir: Path, data_path: Path, packing: bool,
                   cache_dir: Path, output_dir: Path | None = None) -> list[str]:
    """The Hydra overrides of `finetune run lora_sft` for this workload.

    The schedule is constant (no warmup) and the held-out split empty, so every side trains on
    the whole file with one learning rate; a final evaluation and checkpoints are off.
    """
    overrides = [
        f"model.name_or_path={model_dir}", f"data.path={data_path}", "data.format=chat",
        f"data.max_seq_len={settings.max_seq_len}", f"data.packing={str(packing).lower()}",
        "data.val_split=0", f"data.cache_dir={cache_dir}",
        f"trainer.max_steps={settings.steps}",
        f"trainer.micro_batch_size={settings.micro_batch_size}", "trainer.grad_accum_steps=1",
        "trainer.eval_every_n_steps=0", "trainer.save_every_n_steps=0",
        "trainer.max_grad_norm=1.0",
        f"trainer.gradient_checkpointing={str(settings.gradient_checkpointing).lower()}",
        f"optim.lr={settings.lr}", "optim.scheduler=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "peft.method=lora", f"peft.r={settings.lora_r}", f"peft.alpha={settings.lora_alpha}",
        "peft.dropout=0.0", "peft.target_modules=all-linear",
        f"seed={settings.seed}",
    ]
    if settings.precision != "plan":
        overrides.append(f"kernels.precision={settings.precision}")
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return overrides


# ---------------------------------------------------------------- model


def model_config(size: str):
    """The LlamaConfig of `size`: the tiny model's config with the size's dimensions."""
    from finetune.models.tiny import build_tiny_tokenizer, tiny_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    shape = SIZES[size]
    config.hidden_size = shape.hidden
    config.intermediate_size = shape.intermediate
    config.num_hidden_layers = shape.layers
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.hidden // shape.heads
    config.rope_theta = shape.rope_theta
    if shape.vocab is not None:
        config.vocab_size = shape.vocab
    return config


def lora_adapters(config, rank: int) -> tuple[tuple[int, int, int], ...]:
    """(in, out, rank) of every linear layer LoRA adapts with target_modules=all-linear in a
    Llama (q, k, v, o, gate, up, down of each layer; peft leaves the LM head out), as
    finetune.metrics.flops.TrainingMode takes them."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = ((h, q, rank), (h, kv, rank), (h, kv, rank), (q, h, rank), (h, i, rank),
             (h, i, rank), (i, h, rank))
    return layer * config.num_hidden_layers


def parameter_count(config) -> int:
    """Parameters of a Llama with this config (untied embeddings), without building it."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return config.num_hidden_layers * per_layer + 2 * v * h + h


def build_model_folder(size: str, dest: Path, seed: int = SEED, *, dtype: str = "fp32",
                       device: str = "cpu", vocab: int | None = None) -> Path:
    """Write a random-init Llama of `size` with the tiny tokenizer to `dest`, its weights in
    `dtype` (fp32 | bf16), initialised on `device` (an 8B model is built on the GPU); `vocab`
    widens the embedding and LM head to a real tokenizer's size (the text keeps the tiny
    tokenizer's ids)."""
    import torch
    from transformers import LlamaForCausalLM

    from finetune.models.tiny import build_tiny_tokenizer

    config = model_config(size)
    if vocab is not None:
        config.vocab_size = vocab
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(dest)
    return dest


# ---------------------------------------------------------------- data


def vocabulary_words(tokenizer) -> list[str]:
    """Whole lowercase words of the tokenizer's vocabulary (each one token after a space)."""
    words = []
    for token in tokenizer.get_vocab():
        if token.startswith("\u2581") and len(token) > 2 and token[1:].isalpha() \
                and token[1:].islower():
            words.append(token[1:])
    return sorted(words)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float,
                      high: int) -> np.ndarray:
    """n lengths, lognormal around `median` with log-sd `sigma`, in [1, high]."""
    values = rng.lognormal(mean=math.log(max(median, 1.0)), sigma=sigma, size=n)
    return np.clip(np.rint(values), 1, high).astype(np.int64)


def make_rows(n: int, max_seq_len: int, words: list[str], seed: int = SEED) -> list[dict]:
    """n single-turn chat rows whose prompt and answer lengths (in words) are lognormal around
    PROMPT_MEDIAN and ANSWER_MEDIAN of max_seq_len; a few per cent run past max_seq_len."""
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, n, PROMPT_MEDIAN * max_seq_len, PROMPT_SIGMA, 2 * max_seq_len)
    answers = lognormal_lengths(rng, n, ANSWER_MEDIAN * max_seq_len, ANSWER_SIGMA, 4 * max_seq_len)
    vocab = np.array(words)

    def text(length: int) -> str:
        return " ".join(vocab[rng.integers(0, len(vocab), size=length)].tolist())

    return [{"messages": [{"role": "user", "content": text(int(p))},
                          {"role": "assistant", "content": text(int(a))}]}
            for p, a in zip(prompts, answers, strict=True)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def row_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Token length of each chat row with the chat template finetune applies (the tokenizer's,
    else finetune's built-in one)."""
    from finetune.data.template import resolve_template

    template, _ = resolve_template(tokenizer, None)
    return [len(tokenizer.apply_chat_template(row["messages"], chat_template=template,
                                              tokenize=True, return_dict=False))
            for row in rows]


def chat_rows(path: Path) -> list[dict]:
    """The rows of the user's JSON-lines file as chat rows ({"messages": [{"role",
    "content"}]}), read in the format finetune detects (alpaca, chat, sharegpt,
    prompt/completion; preference rows give their chosen answer). Rows finetune would skip are
    left out. WorkloadError for a file that is not JSON lines, holds no usable row, or holds
    plain text documents (no conversation every side can read the same way)."""
    from finetune.data.errors import BadRow, DataError
    from finetune.data.formats import converter_for, detect_format

    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        raw = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WorkloadError(f"--data {path}: cannot read it as JSON lines ({exc})") from None
    try:
        convert = converter_for(detect_format(raw[:100], {}, str(path)), {})
    except DataError as exc:
        raise WorkloadError(f"--data {path}: {exc}") from None
    rows = []
    for row in raw:
        try:
            example = convert(row)
        except BadRow:
            continue
        if example.messages is None:
            raise WorkloadError(f"--data {path}: plain text documents; the benchmark compares "
                                f"supervised chat training: give conversations (chat, alpaca, "
                                f"sharegpt or prompt/completion rows)")
        rows.append({"messages": [{"role": role, "content": content}
                                  for role, content in example.messages]})
    if not rows:
        raise WorkloadError(f"--data {path}: no row finetune can train on (every row was "
                            f"skipped); check it with `finetune data inspect lora_sft "
                            f"data.path={path}`")
    return rows


def weight_count(model_dir: Path) -> int | None:
    """Parameters in a model folder's safetensors files, read from their headers (None when it
    has none)."""
    total, found = 0, False
    for file in sorted(model_dir.glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
                found = True
    return total if found else None


def chat_template_text(model_dir: Path) -> str | None:
    """The chat template a model folder ships (tokenizer_config.json's, or chat_template.jinja),
    read without loading the tokenizer; None when it has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates
            template = next((t.get("template") for t in template
                             if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None
    return None


def length_summary(lengths: list[int]) -> dict[str, float]:
    """Median, p90, p99 and max of token lengths, for the report."""
    array = np.asarray(lengths)
    return {"median": float(np.median(array)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "max": int(array.max())}


# ---------------------------------------------------------------- counting


def real_tokens(batch: dict, pad_id: int) -> int:
    """Tokens of a batch that belong to a document, the same rule for every side: the ones of
    a 2D attention_mask (padded rows); otherwise the input ids that are not the pad token (packed
    rows with a 4D mask, padding-free rows). The tiny tokenizer's pad token is a dedicated
    special token that never occurs in the text, so the two agree where both apply."""
    mask = batch.get("attention_mask")
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum())
    return int((batch["input_ids"] != pad_id).sum())


def trained_tokens(batch: dict) -> int:
    """Tokens with a label after the causal shift (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def tokens_per_second(step_tokens: list[int], step_ends: list[float], warmup: int) -> float:
    """Real tokens of the steps after the first `warmup` ones over the wall time from the end
    of step `warmup` to the end of the last step. `step_tokens[i]` and `step_ends[i]` are step
    i+1's real tokens and the clock when it ended; `warmup` is at least 1, because no side can
    say when its first step began without the start-up before it."""
    if len(step_tokens) != len(step_ends):
        raise ValueError(f"{len(step_tokens)} token counts for {len(step_ends)} step times")
    if warmup < 1 or len(step_ends) < warmup + 1:
        raise ValueError(f"need a warm-up of at least 1 step and a step after it, got "
                         f"warmup={warmup} with {len(step_ends)} steps")
    seconds = step_ends[-1] - step_ends[warmup - 1]
    if seconds <= 0:
        raise ValueError("step end times do not increase")
    return sum(step_tokens[warmup:]) / seconds


# ---------------------------------------------------------------- finetune's batches


def offered(decision) -> list[str]:
    """The candidates of a plan's family decision that this machine can run: the choice, then
    the ones rejected only for ranking lower ("supported; ...")."""
    return [decision.choice] + [r.name for r in decision.rejected
                                if r.reason.startswith("supported")]


def read_side(workdir: Path, mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a side reads from the workdir: settings.json, and the plan of `mode` (packed or
    unpacked) from plan.json."""
    settings = json.loads((workdir / "settings.json").read_text(encoding="utf-8"))
    plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))[mode]
    return settings, plan


def load_side_model(model_dir: Path, plan: dict[str, Any], attention: str | None = None):
    """The workdir's model in the plan's base dtype with `attention` (the plan's when None);
    finetune's `sdpa_varlen` is registered with transformers first when it is asked for."""
    from transformers import AutoModelForCausalLM

    from finetune.kernels import TORCH_DTYPES
    from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa

    attention = attention or plan["attention"]
    if attention == VARLEN_SDPA:
        register_varlen_sdpa()
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=TORCH_DTYPES[plan["base_dtype"]], attn_implementation=attention)


def trl_attention(attention: str) -> str:
    """The attention TRL runs with: the plan's, except that finetune's own `sdpa_varlen` (SDPA
    called once per document) becomes transformers' `sdpa`, the SDPA a TRL user has."""
    from finetune.kernels.varlen_sdpa import VARLEN_SDPA

    return "sdpa" if attention == VARLEN_SDPA else attention


def plan_summary(kernel_plan) -> dict[str, Any]:
    """What the other sides copy from finetune's kernel plan (plan.json of the workdir), and
    the candidates of each family the plan offers (for --gpu's variants)."""
    from finetune.hardware.arch import device_type
    from finetune.kernels import TORCH_DTYPES

    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    hardware = kernel_plan.hardware
    attention = kernel_plan.attn_implementation
    return {"attention": attention, "trl_attention": trl_attention(attention),
            "precision": kernel_plan.precision,
            "base_dtype": names[kernel_plan.base_dtype], "autocast": kernel_plan.autocast_dtype
            is not None, "optimizer": kernel_plan.optimizer,
            "isolation": kernel_plan.packing_isolation if kernel_plan.packing else None,
            "device": device_type(hardware),
            "offered": {family: offered(kernel_plan.kernels[family])
                        for family in ("attention", "fused_ops", "lora", "optimizer")},
            "hardware": {"name": hardware.name, "vendor": hardware.vendor,
                         "torch": hardware.torch, "cpu_bf16": hardware.cpu_bf16,
                         "cpu_amx": hardware.cpu_amx,
                         "peak_bf16_tflops": hardware.peak_bf16_tflops}}


def dump_batches(overrides: list[str], steps: int, dest: Path) -> tuple[dict[str, Any],
                                                                        list[dict[str, int]]]:
    """Build `finetune run lora_sft OVERRIDES`' kernel plan and data the way its setup does,
    save its first `steps` micro-batches to dest/00000.pt, ... and return (plan summary, per
    step {"real", "trained", "rows", "width", "documents"}), documents being the lengths of the
    documents in the micro-batch (finetune.metrics.flops.document_lengths)."""
    import torch

    from finetune.config.compose import compose_run_config
    from finetune.data import build_data
    from finetune.metrics.flops import document_lengths
    from finetune.models import context_length, load_model_config, load_tokenizer
    from finetune.train.setup import plan_kernels

    cfg = compose_run_config("lora_sft", overrides)
    kernel_plan = plan_kernels(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg.data, tokenizer, attention=kernel_plan.attn_implementation,
                      seed=cfg.seed, micro_batch_size=cfg.trainer.micro_batch_size,
                      mask_dtype=kernel_plan.compute_dtype,
                      max_context=context_length(load_model_config(cfg.model)), device="cpu")
    dest.mkdir(parents=True, exist_ok=True)
    stats = []
    for step, batch in zip(range(steps), data.train, strict=False):
        torch.save(batch, dest / f"{step:05d}.pt")
        stats.append({"real": real_tokens(batch, tokenizer.pad_token_id),
                      "trained": trained_tokens(batch), "rows": int(batch["input_ids"].shape[0]),
                      "width": int(batch["input_ids"].shape[1]),
                      "documents": document_lengths(batch)})
    return plan_summary(kernel_plan), stats
