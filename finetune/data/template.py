"""Chat templating and the character spans that are trained.

`ChatRenderer.render(example)` returns the text to tokenize and the character spans whose tokens
get labels. For a conversation the span of assistant turn i starts where the template's
generation prompt after turns [0, i) ends, and ends just after the EOS that closes the turn; both
come from rendering the conversation prefix by prefix with the tokenizer's own
`apply_chat_template`, so no `{% generation %}` markers are needed. When a turn has no EOS the
span is marked so that one is inserted (every assistant turn must teach the model to stop).
Rendering costs ~80 us a call, several per conversation; finetune.data.encode.layout renders
each role sequence once instead, for templates that allow it.

Plain-text examples (text, string prompt/completion) use no template: prompt + completion, and
the completion (or the whole document) is trained; EOS is appended as a token.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from finetune.config.data import TrainOn
from finetune.data.errors import BadRow, DataError
from finetune.data.formats import ASSISTANT, Example
from finetune.data.settings import setting_choice

logger = logging.getLogger(__name__)

# Used when the tokenizer has no chat template (base models) or with data.chat_template=builtin.
# Plain-text role headers, so it works with any vocabulary; EOS closes each assistant turn.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' }}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class Rendered(NamedTuple):
    """Text to tokenize; `spans` are trained (start, end, needs_eos) character ranges."""

    text: str
    spans: tuple[tuple[int, int, bool], ...]


def resolve_template(tokenizer: Any, setting: Any) -> tuple[str, str]:
    """The Jinja template to use and where it came from (`tokenizer`, `builtin`, `config`)."""
    if setting is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        if own:
            return own, "tokenizer"
        logger.info("the tokenizer has no chat template; using the built-in one (docs/data.md)")
        return BUILTIN_CHAT_TEMPLATE, "builtin"
    if setting == "builtin":
        return BUILTIN_CHAT_TEMPLATE, "builtin"
    if isinstance(setting, str) and "{" in setting:
        return setting, "config"
    raise DataError(f"data.chat_template={setting!r} is not null, 'builtin' or a Jinja template")


class ChatRenderer:
    """Renders Examples to text + trained character spans for one tokenizer and template."""

    def __init__(self, tokenizer: Any, template: str, *, train_on: str = "assistant") -> None:
        train_on = setting_choice(TrainOn, train_on, "train_on")
        self.tokenizer, self.template, self.train_on = tokenizer, template, train_on
        self.eos = tokenizer.eos_token or ""

    def render(self, example: Example) -> Rendered:
        """The text to tokenize and its trained spans; BadRow if the template refuses it."""
        if example.segments is not None:
            return self._render_segments(example.segments)
        assert example.messages is not None
        return self._render_exact(example.messages)

    def _render_segments(self, segments: list[tuple[str, bool]]) -> Rendered:
        text, spans, pos = [], [], 0
        for piece, trained in segments:
            if trained or self.train_on == "all":
                spans.append((pos, pos + len(piece), False))
            text.append(piece)
            pos += len(piece)
        # The EOS appended after the text is trained with the last trained segment.
        if spans:
            start, end, _ = spans[-1]
            spans[-1] = (start, end, end == pos)
        return Rendered("".join(text), tuple(spans))

    def _apply(self, messages: list[tuple[str, str]], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], chat_template=self.template,
                tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja TemplateError from raise_exception, or a bad template
            text = str(exc).strip() or type(exc).__name__
            raise BadRow("template_error", f"the chat template rejected this conversation "
                         f"({text})", "fix the row, or set data.chat_template=builtin") from None

    def _trained_turns(self, messages: list[tuple[str, str]]) -> list[int]:
        turns = [i for i, (role, _) in enumerate(messages) if role == ASSISTANT]
        return turns[-1:] if self.train_on == "last_turn" else turns

    def _turn_end(self, text: str, start: int, end: int) -> tuple[int, bool]:
        """End of the trained part of a turn in text[start:end]: after its last EOS, else the
        turn without trailing whitespace (and an EOS must be inserted)."""
        found = text.rfind(self.eos, start, end) if self.eos else -1
        if found >= 0:
            return found + len(self.eos), False
        return start + len(text[start:end].rstrip()), True

    def _render_exact(self, messages: list[tuple[str, str]]) -> Rendered:
        full = self._apply(messages)
        spans, cursor = [], 0
        for i in self._trained_turns(messages):
            span = self._span_by_prefix(messages, i, full)
            if span is None:
                span = self._span_by_search(messages[i][1], full, cursor)
            spans.append(span)
            cursor = span[1]
        return Rendered(full, tuple(spans))

    def _span_by_prefix(self, messages, i: int, full: str) -> tuple[int, int, bool] | None:
        if i == 0:
            return None
        try:
            prompt = self._apply(messages[:i], generation_prompt=True)
            turn = full if i == len(messages) - 1 else self._apply(messages[:i + 1])
        except BadRow:
            return None
        if not (full.startswith(prompt) and full.startswith(turn) and len(turn) >= len(prompt)):
            return None
        end, needs_eos = self._turn_end(full, len(prompt), len(turn))
        return len(prompt), end, needs_eos

    def _span_by_search(self, content: str, full: str, cursor: int) -> tuple[int, int, bool]:
        """Fallback for templates that render earlier turns differently once more follow."""
        needle = content.strip()
        start = full.find(needle, cursor) if needle else -1
        if start < 0:
            raise BadRow("template_mismatch", "cannot find the assistant turn in the rendered "
                         "conversation (the chat template rewrites it)",
                         "set data.chat_template=builtin or use a template that prints turns "
                         "as is")
        end = start + len(needle)
        rest = full[end:]
        if self.eos and rest.lstrip().startswith(self.eos):
            return start, end + (len(rest) - len(rest.lstrip())) + len(self.eos), False
        return start, end, True
