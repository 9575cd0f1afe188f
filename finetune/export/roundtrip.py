"""The round trip that verifies a GGUF export: read the file back with transformers' GGUF loader
and compare it with the model it came from on fixed chat prompts.

Checks: the chat template survives; the file's tokenizer gives the same ids for each rendered
prompt; and the logits at every position agree. Storage rounds the weights (f16 alone moves the
built-in tiny model's logits by about 1e-3), so the file is compared twice: with the model whose
weights are rounded exactly as the file stores them (f16, bf16, or q8_0 quantised and
dequantised by gguf.quants), which must agree within STORED_MAX_ABS_DIFF (what is left is float
arithmetic: any wrong name, permutation or hyperparameter shows as a large difference); and with
the merged model itself, whose top-1 next token must agree at MIN_TOP1_AGREEMENT of positions.
That second figure measures the storage, not the file: on a near-random model (next-token logits
near ties) q8_0 rounding alone can reorder the top two at a few positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STORED_MAX_ABS_DIFF = 1e-4
MIN_TOP1_AGREEMENT = 0.99
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Name three primary colours, please."}],
    [{"role": "user", "content": "Write 2+2 in words."},
     {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And 3 times 7?"}],
]


@dataclass
class RoundTrip:
    """The figures of one round trip and whether they pass for the storage used."""

    quant: str
    positions: int
    max_abs_diff: float
    stored_max_abs_diff: float
    top1_agreement: float
    tokens_match: bool
    template_match: bool
    rope_match: bool = True

    @property
    def passed(self) -> bool:
        if not (self.tokens_match and self.template_match and self.rope_match):
            return False
        return (self.stored_max_abs_diff <= STORED_MAX_ABS_DIFF
                and self.top1_agreement >= MIN_TOP1_AGREEMENT)

    def summary(self) -> str:
        return (f"round trip ({self.quant}, {self.positions} positions over {len(PROMPTS)} chat "
                f"prompts): max |logit diff| {self.max_abs_diff:.3g} against the merged model, "
                f"{self.stored_max_abs_diff:.3g} against it with weights rounded as stored "
                f"(needs <= {STORED_MAX_ABS_DIFF:g}); top-1 agreement {self.top1_agreement:.2%} "
                f"(needs >= {MIN_TOP1_AGREEMENT:.0%}); token ids "
                f"{'match' if self.tokens_match else 'DIFFER'}; chat template "
                f"{'kept' if self.template_match else 'LOST'}"
                f"{'' if self.rope_match else '; rope scaling DIFFERS'}: "
                f"{'pass' if self.passed else 'FAIL'}")


def prompt_ids(tokenizer, chat_template: str | None) -> tuple[list[list[int]], list[str]]:
    """The fixed prompts rendered through `chat_template` (plain text without one): (their ids,
    the texts)."""
    texts = []
    for messages in PROMPTS:
        if chat_template:
            texts.append(tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                                       tokenize=False,
                                                       add_generation_prompt=True))
        else:
            texts.append("\n".join(m["content"] for m in messages))
    return [tokenizer(text, add_special_tokens=chat_template is None)["input_ids"]
            for text in texts], texts


def reference_logits(model, ids: list[list[int]]) -> list:
    """The model's logits (fp32, CPU) for each prompt, taken before the model is let go."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([row], device=model.device)).logits[0].float().cpu()
                for row in ids]


def round_as_stored(model, quant: str) -> None:
    """Round `model`'s matrices in place to what a GGUF file of `quant` holds (vectors are kept
    in f32 there); q8_0 through gguf.quants' own quantiser and dequantiser."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    block = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]
    with torch.no_grad():
        for weight in model.state_dict().values():
            if weight.ndim != 2:
                continue
            if quant == "q8_0" and weight.shape[-1] % block == 0:
                array = weight.detach().float().cpu().numpy()
                stored = gguf.quants.dequantize(gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0)
                weight.copy_(torch.from_numpy(stored).reshape(weight.shape))
            else:
                weight.copy_(weight.to(torch.bfloat16 if quant == "bf16" else torch.float16))


def file_inv_freq(path: Path):
    """The rotary frequencies a llama.cpp reader of `path` uses: base frequencies from the
    file's theta and dimension count, divided by its linear factor or its rope_freqs tensor."""
    import numpy as np
    from gguf import GGUFReader

    from finetune.export.gguf import base_inv_freq

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    theta = reader.fields[f"{arch}.rope.freq_base"].contents()
    dim = reader.fields[f"{arch}.rope.dimension_count"].contents()
    inv_freq = base_inv_freq(theta, dim)
    if f"{arch}.rope.scaling.factor" in reader.fields:
        inv_freq = inv_freq / reader.fields[f"{arch}.rope.scaling.factor"].contents()
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            inv_freq = inv_freq / np.asarray(tensor.data, dtype=np.float64)
    return inv_freq


def verify(path: Path, quant: str, ids: list[list[int]], texts: list[str], expected: list,
           stored: list, chat_template: str | None, rope: dict | None = None,
           inv_freq=None) -> RoundTrip:
    """Load `path` with transformers' GGUF loader and compare it with the merged model's logits
    (`expected`) and those of the model rounded as stored (`stored`).

    transformers' GGUF loader does not read rope scaling for these architectures: with `rope`
    (the merged model's scaling) the file's own description (file_inv_freq) is compared with
    the merged model's frequencies `inv_freq`, and the model is loaded with `rope` so that the
    logits compare like with like."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    extra = {}
    rope_match = True
    if rope is not None:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        config.rope_parameters = dict(rope)
        extra["config"] = config
        rope_match = bool(np.allclose(file_inv_freq(path), inv_freq, rtol=1e-5, atol=0))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 **extra)
    model.eval()
    add_special = chat_template is None
    tokens_match = all(tokenizer(text, add_special_tokens=add_special)["input_ids"] == row
                       for text, row in zip(texts, ids, strict=True))
    template_match = (tokenizer.chat_template or None) == (chat_template or None)
    worst, stored_worst, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for row, want, rounded in zip(ids, expected, stored, strict=True):
            got = model(torch.tensor([row])).logits[0].float()
            worst = max(worst, (got - want).abs().max().item())
            stored_worst = max(stored_worst, (got - rounded).abs().max().item())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            positions += len(row)
    return RoundTrip(quant, positions, worst, stored_worst, agree / positions, tokens_match,
                     template_match, rope_match)
