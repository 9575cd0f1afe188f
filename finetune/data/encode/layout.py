"""The chat-template shortcut: render each role sequence once, then fill in the contents.

Rendering a template costs ~80 us a call, several calls per conversation. When the template only
ever *prints* message contents (checked on its Jinja syntax tree: no filter such as `trim`, no
condition, comparison or `in` on a content), the text of every conversation with the same role
sequence is the same literal pieces around the contents. `LayoutRenderer` renders that layout
once with placeholder contents and reuses it; the first conversation of each role sequence is
still rendered the slow way and compared, and a layout that differs is not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from finetune.data.errors import BadRow
from finetune.data.formats import Example
from finetune.data.template import ChatRenderer, Rendered

logger = logging.getLogger(__name__)

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



class LayoutRenderer(ChatRenderer):
    """ChatRenderer that reuses each role sequence's layout when the template allows it (see
    the module); renders exactly what ChatRenderer renders."""

    def __init__(self, tokenizer: Any, template: str, *, train_on: str = "assistant") -> None:
        super().__init__(tokenizer, template, train_on=train_on)
        self.shortcut = prints_contents_only(template)
        self._layouts: dict[tuple[str, ...], _Layout | None] = {}
        logger.debug("chat template layout shortcut: %s", "on" if self.shortcut else "off")

    def render(self, example: Example) -> Rendered:
        if self.shortcut and example.messages:
            roles, contents = zip(*example.messages, strict=True)
            layout = self._layouts.get(roles, _NO_LAYOUT_YET)
            if layout is _NO_LAYOUT_YET:
                layout = self._layouts[roles] = self._layout_for(example.messages)
            if layout is not None:
                return self._apply_layout(layout, contents)
        return super().render(example)

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
