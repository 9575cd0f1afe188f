"""Templating and masking: labels cover exactly the assistant text + EOS, BOS once, EOS always."""

from __future__ import annotations

import random

import numpy as np
import pytest

from finetune.data.encode import FastEncoder, OffsetEncoder
from finetune.data.encode.layout import LayoutRenderer, prints_contents_only
from finetune.data.errors import RowOrigin
from finetune.data.formats import Example
from finetune.data.template import BUILTIN_CHAT_TEMPLATE, ChatRenderer, resolve_template
from finetune.data.tokenized import RowCounts

CONVERSATION = Example(messages=[("system", "You add numbers."), ("user", "1 + 1?"),
                                 ("assistant", "Two."), ("user", "And 2 + 2?"),
                                 ("assistant", "Four, surely.")])

# Like the tiny template, but assistant turns end with a newline instead of EOS.
NO_EOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
                   "{{ m['content'] }}{{ '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Trims contents: the layout shortcut must switch itself off.
TRIM_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
                 "{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def encode(tokenizer, example: Example, *, template=None, train_on="assistant", fast=True,
           max_seq_len=512, counts=None):
    """One example through the fast encoder (what runs use) or the plain one."""
    encoder = (FastEncoder if fast else OffsetEncoder)(
        tokenizer, template or tokenizer.chat_template, train_on=train_on,
        max_seq_len=max_seq_len)
    rows = encoder.encode([(example, RowOrigin("t.jsonl", 1))], counts or RowCounts())
    return rows.example(0) if len(rows) else None


def trained_text(tokenizer, ids, trained) -> str:
    return tokenizer.decode(np.asarray(ids)[np.asarray(trained)].tolist())


@pytest.mark.parametrize("train_on,expected", [
    ("assistant", "Two.<|end|>Four, surely.<|end|>"),
    ("last_turn", "Four, surely.<|end|>"),
])
def test_labels_decode_to_exactly_the_assistant_text_and_eos(tokenizer, train_on, expected):
    ids, trained = encode(tokenizer, CONVERSATION, train_on=train_on)
    assert trained_text(tokenizer, ids, trained) == expected


def test_train_on_all_trains_everything_but_the_first_token(tokenizer):
    ids, trained = encode(tokenizer, CONVERSATION, train_on="all")
    assert not trained[0] and trained[1:].all()


@pytest.mark.parametrize("template", ["tokenizer", "builtin"])
def test_bos_exactly_once(tokenizer, template):
    ids, _ = encode(tokenizer, CONVERSATION,
                    template=BUILTIN_CHAT_TEMPLATE if template == "builtin" else None)
    assert ids[0] == tokenizer.bos_token_id
    assert int((np.asarray(ids) == tokenizer.bos_token_id).sum()) == 1


def test_builtin_template_is_used_without_a_tokenizer_template(tokenizer):
    from finetune.models.tiny import build_tiny_tokenizer

    bare = build_tiny_tokenizer()
    bare.chat_template = None
    template, origin = resolve_template(bare, None)
    assert (template, origin) == (BUILTIN_CHAT_TEMPLATE, "builtin")
    ids, trained = encode(bare, CONVERSATION, template=template)
    text = bare.decode(ids.tolist())
    assert text.startswith("<|begin|>### System:\nYou add numbers.\n\n### User:\n1 + 1?")
    assert trained_text(bare, ids, trained) == "Two.<|end|>Four, surely.<|end|>"


# The generation prompt ends in a space, so the first answer token ("\u2581the") straddles it.
SPACE_PROMPT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                         "{{ 'A: ' + m['content'] + eos_token + '\n' }}"
                         "{% else %}{{ 'Q: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")


@pytest.mark.parametrize("fast", [True, False])
def test_a_token_straddling_the_turn_start_is_trained(tokenizer, fast):
    example = Example(messages=[("user", "And 2 + 2?"), ("assistant", "the number is four.")])
    ids, trained = encode(tokenizer, example, template=SPACE_PROMPT_TEMPLATE, fast=fast)
    first = int(np.flatnonzero(trained)[0])
    assert tokenizer.convert_ids_to_tokens(int(ids[first])) == "\u2581the"
    assert trained_text(tokenizer, ids, trained) == " the number is four.<|end|>"


def test_eos_is_inserted_when_the_template_has_none(tokenizer):
    ids, trained = encode(tokenizer, CONVERSATION, template=NO_EOS_TEMPLATE)
    assert trained_text(tokenizer, ids, trained) == "Two.<|end|>Four, surely.<|end|>"
    # the rest of the rendering is the template's own
    assert "<|user|>\nAnd 2 + 2?\n" in tokenizer.decode(ids.tolist())


def test_layout_shortcut_only_for_templates_that_print_contents(tokenizer):
    assert prints_contents_only(tokenizer.chat_template)
    assert prints_contents_only(BUILTIN_CHAT_TEMPLATE)
    assert not prints_contents_only(TRIM_TEMPLATE)
    assert not prints_contents_only("{% for m in messages %}{% if m.content %}x{% endif %}"
                                    "{% endfor %}")
    assert not prints_contents_only("{% for m in messages %}{{ m.get('content') }}{% endfor %}")
    assert prints_contents_only("{% for m in messages %}{% set c = m['content'] %}{{ c }}"
                                "{% if c is string %}{% endif %}{% endfor %}")


def test_trimming_template_gives_trimmed_spans(tokenizer):
    example = Example(messages=[("user", "  hi  "), ("assistant", "  hello  ")])
    ids, trained = encode(tokenizer, example, template=TRIM_TEMPLATE)
    assert trained_text(tokenizer, ids, trained) == "hello<|end|>"


def _random_conversation(rng: random.Random) -> Example:
    words = ["alpha", "beta", " gamma", "delta\n", "<|end|>", "ünï", "  ", "42", "{{x}}", ""]
    turns = [("system", "sys " + rng.choice(words))] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        turns.append(("user", "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))))
        turns.append(("assistant", "".join(rng.choice(words) for _ in range(rng.randint(0, 4)))))
    return Example(messages=turns)


@pytest.mark.parametrize("template", ["tokenizer", "builtin", "no_eos"])
def test_layout_shortcut_matches_rendering_every_row(tokenizer, template):
    source = {"tokenizer": tokenizer.chat_template, "builtin": BUILTIN_CHAT_TEMPLATE,
              "no_eos": NO_EOS_TEMPLATE}[template]
    rng = random.Random(0)
    fast = LayoutRenderer(tokenizer, source)
    exact = ChatRenderer(tokenizer, source)
    assert fast.shortcut
    for _ in range(200):
        example = _random_conversation(rng)
        assert fast.render(example) == exact.render(example)


@pytest.mark.parametrize("fast", [True, False])
def test_tokenizer_without_offsets_gives_the_same_labels(tokenizer, fast):
    class NoOffsets:  # a "slow" tokenizer: no backend, only __call__
        def __init__(self, inner):
            self.inner = inner
            self.bos_token_id, self.eos_token_id = inner.bos_token_id, inner.eos_token_id
            self.eos_token, self.chat_template = inner.eos_token, inner.chat_template

        def __call__(self, texts, add_special_tokens=False):
            return self.inner(texts, add_special_tokens=add_special_tokens)

        def apply_chat_template(self, *args, **kwargs):
            return self.inner.apply_chat_template(*args, **kwargs)

    without = encode(NoOffsets(tokenizer), CONVERSATION, fast=fast)
    tracked = encode(tokenizer, CONVERSATION, fast=False)
    assert np.array_equal(without[0], tracked[0]) and np.array_equal(without[1], tracked[1])


@pytest.mark.parametrize("mode", ["truncate", "drop", "error"])
def test_truncation_modes_count_rows(tokenizer, mode):
    from finetune.data import DataError

    long = Example(messages=[("user", "word " * 20), ("assistant", "answer " * 20)])
    counts = RowCounts()
    if mode == "error":
        with pytest.raises(DataError, match=r"t.jsonl:1: \d+ tokens, longer than data.max_seq_len=32"):
            encode_mode(tokenizer, long, mode, counts)
        return
    result = encode_mode(tokenizer, long, mode, counts)
    if mode == "truncate":
        assert len(result) == 1 and len(result.example(0)[0]) == 32
        assert (counts.truncated, counts.dropped) == (1, 0)
    else:
        assert len(result) == 0 and (counts.truncated, counts.dropped) == (0, 1)


def test_truncation_that_leaves_nothing_trained_drops_the_row(tokenizer):
    prompt_only = Example(messages=[("user", "word " * 40), ("assistant", "yes")])
    counts = RowCounts()
    assert len(encode_mode(tokenizer, prompt_only, "truncate", counts)) == 0
    assert counts.dropped == 1


def encode_mode(tokenizer, example, mode, counts):
    encoder = FastEncoder(tokenizer, tokenizer.chat_template, max_seq_len=32, truncation=mode)
    return encoder.encode([(example, RowOrigin("t.jsonl", 1))], counts)


def test_the_encoding_copy_without_template_processing_gives_the_same_tokens(tokenizer):
    from tokenizers import processors

    from finetune.data.encode.fast import without_template_processing

    backend = tokenizer.backend_tokenizer
    assert isinstance(backend.post_processor, processors.TemplateProcessing)
    copy = without_template_processing(backend)
    assert copy is not backend and copy.post_processor is None
    texts = ["<|begin|><|user|>\nnaïve café ✓  two  spaces<|end|>\n", "", " lead", "x\n\ny"]
    for ours, theirs in zip(copy.encode_batch(texts, add_special_tokens=False),
                            backend.encode_batch(texts, add_special_tokens=False), strict=True):
        assert (ours.ids, ours.offsets) == (theirs.ids, theirs.offsets)
    backend_copy = without_template_processing(copy)  # no TemplateProcessing: used as is
    assert backend_copy is copy
    copy.post_processor = processors.ByteLevel(trim_offsets=True)
    assert without_template_processing(copy) is copy
