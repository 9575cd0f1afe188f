"""Chat templating and the character spans that are trained.

`ChatRenderer.render(example)` returns the text to tokenize and the character spans whose tokens
get labels. For a conversation the span of assistant turn i starts where the template's
generation prompt after turns [0, i) ends, and ends just after the EOS that closes the turn; both
come from rendering the conversation prefix by prefix with the tokenizer's own
`apply_chat_template`, so no `{% generation %}` markers are needed. When a turn has no EOS the
span is marked so that one is inserted (every assistant turn must teach the model to stop).

Rendering a template per row costs ~80 us, several times per conversation. When the template
only ever *prints* message contents (checked on its Jinja syntax tree), the text of every
conversation with the same role sequence is the same literal pieces around the contents; that
layout is rendered once with placeholder contents and reused, and the first conversation of
each role sequence is still rendered the slow way and compared.

Plain-text examples (text, string prompt/completion) use no template: prompt + completion, and
the completion (or the whole document) is trained; EOS is appended as a token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

from finetune.data.errors import BadRow, DataError
from finetune.data.formats import ASSISTANT, Example

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
TRAIN_ON = ("assistant", "all", "last_turn")


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


_NO_LAYOUT_YET = object()
_PRINT_ONLY_TESTS = {"string", "defined", "undefined", "none", "mapping", "iterable", "sequence"}


def _parse_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension

    class _GenerationTag(Extension):  # parse-only: `{% generation %}` wraps its body unchanged
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    env = jinja2.Environment(extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    return env.parse(source)


def prints_contents_only(source: str) -> bool:
    """True when the template uses message contents only to print them (or to test their type).

    Any other use (a filter such as `trim`, a comparison, `in`, a method call, a condition on
    the content) can make the rendering depend on the content, so the layout shortcut is off.
    """
    from jinja2 import nodes

    try:
        tree = _parse_template(source)
    except Exception:  # a syntax the parse-only environment does not know: stay exact
        return False

    def is_content(node) -> bool:
        return ((isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                 and node.arg.value == "content")
                or (isinstance(node, nodes.Getattr) and node.attr == "content"))

    tainted: set[str] = set()
    ok = True

    def allowed(chain: list) -> bool:
        for child, parent in zip(chain[:-1], chain[1:], strict=False):
            if isinstance(parent, (nodes.Add, nodes.Concat)):
                continue
            if isinstance(parent, nodes.Output):
                return True
            if isinstance(parent, nodes.Test):
                return parent.node is child and parent.name in _PRINT_ONLY_TESTS
            if isinstance(parent, nodes.Assign) and isinstance(parent.target, nodes.Name):
                tainted.add(parent.target.name)
                return True
            return False
        return False

    def visit(node, path: list) -> None:
        nonlocal ok
        if not ok:
            return
        here = path + [node]
        if (is_content(node) or (isinstance(node, nodes.Name) and node.ctx == "load"
                                 and node.name in tainted)):
            if not allowed(list(reversed(here))):
                ok = False
            return
        if isinstance(node, nodes.Const) and node.value == "content":
            ok = False  # e.g. message.get('content'): a use we cannot see through
            return
        for child in node.iter_child_nodes():
            visit(child, here)

    for _ in range(2):  # a second pass sees names assigned from contents later in the file
        visit(tree, [])
    return ok


@dataclass(frozen=True)
class _Layout:
    """Literal pieces around the contents, and the trained spans as (ka, base_a, kb, base_b,
    needs_eos): a span starts at base_a plus the length of contents [0, ka), and ends at base_b
    plus the length of contents [0, kb)."""

    pieces: tuple[str, ...]
    spans: tuple[tuple[int, int, int, int, bool], ...]


class ChatRenderer:
    """Renders Examples to text + trained character spans for one tokenizer and template."""

    def __init__(self, tokenizer: Any, template: str, *, train_on: str = "assistant") -> None:
        if train_on not in TRAIN_ON:
            raise DataError(f"data.train_on={train_on!r} is not one of {', '.join(TRAIN_ON)}")
        self.tokenizer, self.template, self.train_on = tokenizer, template, train_on
        self.eos = tokenizer.eos_token or ""
        self.fast = prints_contents_only(template)
        self._layouts: dict[tuple[str, ...], _Layout | None] = {}
        logger.debug("chat template layout shortcut: %s", "on" if self.fast else "off")

    def render(self, example: Example) -> Rendered:
        if example.segments is not None:
            return self._render_segments(example.segments)
        assert example.messages is not None
        if self.fast and example.messages:
            roles, contents = zip(*example.messages, strict=True)
            layout = self._layouts.get(roles, _NO_LAYOUT_YET)
            if layout is _NO_LAYOUT_YET:
                layout = self._layouts[roles] = self._layout_for(example.messages)
            if layout is not None:
                return self._apply_layout(layout, contents)
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
                         f"({text}); fix the row, set data.chat_template=builtin, or set "
                         "data.on_bad_row=skip") from None

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
                         "conversation (the chat template rewrites it); set "
                         "data.chat_template=builtin or use a template that prints turns as is")
        end = start + len(needle)
        rest = full[end:]
        if self.eos and rest.lstrip().startswith(self.eos):
            return start, end + (len(rest) - len(rest.lstrip())) + len(self.eos), False
        return start, end, True

    def _layout_for(self, messages: list[tuple[str, str]]) -> _Layout | None:
        """Render the role sequence with placeholder contents; None if it does not split cleanly.

        Placeholders carry surrounding whitespace so a template that trims contents is caught.
        """
        marks = [f" \n\ue000{k}\ue001\n " for k in range(len(messages))]
        placeholder = [(role, marks[k]) for k, (role, _) in enumerate(messages)]
        try:
            rendered = self._render_exact(placeholder)
        except BadRow:
            return None
        text, pieces, pos = rendered.text, [], 0
        bounds = []  # (start, end) of each placeholder in the text
        for mark in marks:
            at = text.find(mark, pos)
            if at < 0 or text.count(mark) != 1:
                return None
            pieces.append(text[pos:at])
            bounds.append((at, at + len(mark)))
            pos = at + len(mark)
        pieces.append(text[pos:])

        def locate(char: int) -> tuple[int, int] | None:
            """(piece index, offset) of a character position that lies in a literal piece."""
            piece_start = 0
            for k, (a, b) in enumerate(bounds):
                if char <= a:
                    return k, char - piece_start
                if char < b:
                    return None
                piece_start = b
            return len(bounds), char - piece_start

        before = [0]  # length of the pieces before piece k
        for piece in pieces:
            before.append(before[-1] + len(piece))
        spans = []
        for start, end, needs_eos in rendered.spans:
            a, b = locate(start), locate(end)
            if a is None or b is None:
                return None
            spans.append((a[0], before[a[0]] + a[1], b[0], before[b[0]] + b[1], needs_eos))
        layout = _Layout(tuple(pieces), tuple(spans))
        exact = self._render_exact(messages)
        if self._apply_layout(layout, [c for _, c in messages]) != exact:
            logger.info("chat template layout for roles %s differs from the template; rendering "
                        "each such conversation", [r for r, _ in messages])
            return None
        return layout

    @staticmethod
    def _apply_layout(layout: _Layout, contents: list[str]) -> Rendered:
        parts: list[str] = [""] * (2 * len(contents) + 1)
        parts[0::2] = layout.pieces
        parts[1::2] = contents
        before = [0, *accumulate(map(len, contents))]  # length of the contents before turn k
        spans = tuple((base_a + before[ka], base_b + before[kb], needs_eos)
                      for ka, base_a, kb, base_b, needs_eos in layout.spans)
        return Rendered("".join(parts), spans)
