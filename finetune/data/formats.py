"""Data formats: a registry keyed by name, each turning one row into an `Example`.

An Example is either a conversation (role, content turns, rendered later with a chat template)
or plain text made of segments, each trained or not (raw documents, string prompt/completion
pairs). Column mapping (`data.columns.FIELD=COLUMN`) renames before conversion, so every format
reads its own field names. `auto` picks the first format whose required fields the first rows
have, and logs the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune.data.errors import BadRow, DataError

logger = logging.getLogger(__name__)

ASSISTANT = "assistant"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": ASSISTANT, "assistant": ASSISTANT,
                  "chatgpt": ASSISTANT, "model": ASSISTANT, "system": "system", "tool": "tool"}


@dataclass(slots=True)
class Example:
    """One training example. Exactly one of `messages` and `segments` is set.

    `messages`: (role, content) turns. `segments`: (text, trained) pieces of plain text.
    `rejected`: for preference rows, the same prompt with the rejected answer (kept for DPO;
    supervised training uses the chosen one).
    """

    messages: list[tuple[str, str]] | None = None
    segments: list[tuple[str, bool]] | None = None
    rejected: Example | None = None


@dataclass(frozen=True)
class DataFormat:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], Example]
    description: str

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


def _text(row: Mapping[str, Any], field: str, *, optional: bool = False) -> str:
    value = row.get(field)
    if value.__class__ is str:
        return value
    if value is None:
        if optional:
            return ""
        raise BadRow("missing_field", f"field {field!r} is empty", f"give {field!r} a value")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field {field!r} must be a string, got "
                     f"{type(value).__name__} ({value!r:.40})",
                     f"write it as text in the file, e.g. \"{field}\": \"{value!s:.40}\"")
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type", "text") == "text" and "text" in part:
                parts.append(str(part["text"]))
            else:
                raise BadRow("wrong_type", f"{where}: only text content parts are supported, got "
                             f"{part!r:.80}")
        return "".join(parts)
    raise BadRow("wrong_type", f"{where}: content must be a string, got {type(value).__name__}")


def _turns(value: Any, field: str) -> list[tuple[str, str]]:
    """A message list in OpenAI (role/content) or ShareGPT (from/value) shape."""
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"field {field!r} must be a list of messages, got "
                     f"{type(value).__name__}")
    turns = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise BadRow("wrong_type", f"{where} must be an object, got {type(message).__name__}")
        if "role" in message:
            role = message["role"]
            content = message.get("content")
        elif "from" in message:
            role = SHAREGPT_ROLES.get(str(message["from"]).lower())
            if role is None:
                raise BadRow("unknown_role", f"{where}: unknown speaker from={message['from']!r}; "
                             f"known: {', '.join(SHAREGPT_ROLES)}")
            content = message.get("value")
        else:
            raise BadRow("missing_field", f"{where} has no 'role' (or 'from'); found "
                         f"{', '.join(map(str, message)) or 'no fields'}")
        if not isinstance(role, str):
            raise BadRow("wrong_type", f"{where}: role must be a string, got {role!r}")
        turns.append((role, _content(content, where)))
    return turns


def _conversation(turns: list[tuple[str, str]], system: str = "") -> Example:
    if system and not any(role == "system" for role, _ in turns):
        turns = [("system", system)] + turns
    if not any(role == ASSISTANT for role, _ in turns):
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn, so nothing "
                     "would be trained", "add the assistant's answer or remove the row")
    return Example(messages=turns)


def _alpaca(row: Mapping[str, Any]) -> Example:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return _conversation([("user", prompt), (ASSISTANT, _text(row, "output"))],
                         _text(row, "system", optional=True))


def _chat(row: Mapping[str, Any]) -> Example:
    return _conversation(_turns(row.get("messages"), "messages"), _text(row, "system", optional=True))


def _sharegpt(row: Mapping[str, Any]) -> Example:
    return _conversation(_turns(row.get("conversations"), "conversations"),
                         _text(row, "system", optional=True))


def _text_doc(row: Mapping[str, Any]) -> Example:
    return Example(segments=[(_text(row, "text"), True)])


def _pair(prompt: Any, answer: Any, answer_field: str) -> Example:
    """A prompt and an answer: plain strings, or message lists (conversational)."""
    if isinstance(answer, list) or isinstance(prompt, list):
        turns = (_turns(prompt, "prompt") if isinstance(prompt, list)
                 else [("user", prompt)] if prompt else [])
        answer_turns = (_turns(answer, answer_field) if isinstance(answer, list)
                        else [(ASSISTANT, _content(answer, answer_field))])
        return _conversation(turns + answer_turns)
    if prompt is not None and not isinstance(prompt, str):
        raise BadRow("wrong_type", f"field 'prompt' must be a string or a message list, got "
                     f"{type(prompt).__name__}")
    if not isinstance(answer, str):
        raise BadRow("wrong_type", f"field {answer_field!r} must be a string or a message list, "
                     f"got {type(answer).__name__}")
    return Example(segments=[(prompt or "", False), (answer, True)])


def _prompt_completion(row: Mapping[str, Any]) -> Example:
    return _pair(row.get("prompt"), row.get("completion"), "completion")


def _preference(row: Mapping[str, Any]) -> Example:
    chosen = _pair(row.get("prompt"), row.get("chosen"), "chosen")
    chosen.rejected = _pair(row.get("prompt"), row.get("rejected"), "rejected")
    return chosen


FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("preference", ("prompt", "chosen", "rejected"), (), _preference,
               "prompt/chosen/rejected (DPO pairs; supervised training uses prompt+chosen)"),
    DataFormat("chat", ("messages",), ("system",), _chat,
               "OpenAI messages: [{role, content}, ...]"),
    DataFormat("sharegpt", ("conversations",), ("system",), _sharegpt,
               "conversations: [{from: human|gpt|system, value}, ...]"),
    DataFormat("alpaca", ("instruction", "output"), ("input", "system"), _alpaca,
               "instruction/input/output"),
    DataFormat("prompt_completion", ("prompt", "completion"), (), _prompt_completion,
               "prompt/completion: strings (plain text) or message lists"),
    DataFormat("text", ("text",), (), _text_doc, "raw documents, every token trained"),
)}
# Preference rows may leave the prompt inside chosen/rejected conversations.
_DETECT_KEYS = {"preference": ("chosen", "rejected")}


class RowConverter:
    """Turns raw rows of one source into Examples for a given format and column mapping."""

    def __init__(self, fmt: DataFormat, columns: Mapping[str, str]) -> None:
        unknown = sorted(set(columns) - set(fmt.fields))
        if unknown:
            raise DataError(f"data.columns has {', '.join(unknown)}, which the {fmt.name} format "
                            f"does not read; its fields are {', '.join(fmt.fields)}")
        self.format = fmt
        self.rename = {column: field for field, column in columns.items() if column != field}
        self.required = tuple(columns.get(f, f) for f in _DETECT_KEYS.get(fmt.name, fmt.required))

    def __call__(self, row: Mapping[str, Any]) -> Example:
        missing = [c for c in self.required if c not in row]
        if missing:
            raise BadRow("missing_field", *_missing_message(missing, row, self.format,
                                                            self.rename))
        if self.rename:
            row = {self.rename.get(k, k): v for k, v in row.items()}
        return self.format.convert(row)


def _missing_message(missing: list[str], row: Mapping[str, Any], fmt: DataFormat,
                     rename: Mapping[str, str]) -> tuple[str, str]:
    """(what is wrong, how to fix it); the fix names the format whose fields the row has."""
    found = ", ".join(map(str, row)) or "none"
    fields = ", ".join(repr(m) for m in missing)
    hint = rename.get(missing[0], missing[0])
    other = next((f.name for f in FORMATS.values()
                  if f is not fmt and _has_fields(row, f, {})), None)
    fix = (f"this row has the fields of the {other} format: set data.format={other} (or "
           "data.format=auto to detect it), " if other else "")
    return (f"missing field {fields} for the {fmt.name} format; found fields: {found}",
            f"{fix}map a column with data.columns.{hint}=COLUMN, or fix the row")


def _has_fields(row: Mapping[str, Any], fmt: DataFormat, columns: Mapping[str, str]) -> bool:
    keys = _DETECT_KEYS.get(fmt.name, fmt.required)
    return all(columns.get(k, k) in row for k in keys)


def detect_format(rows: list[Mapping[str, Any]], columns: Mapping[str, str], where: str) -> str:
    """The first registered format whose required fields the first row that has any has."""
    for row in rows:
        for fmt in FORMATS.values():
            if _has_fields(row, fmt, columns):
                logger.info("data format of %s: %s (auto-detected from its fields %s)", where,
                            fmt.name, ", ".join(map(str, row)))
                return fmt.name
    found = ", ".join(map(str, rows[0])) if rows else "no rows"
    known = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in FORMATS.values())
    raise DataError(f"{where}: cannot tell the data format from the fields ({found}). Known "
                    f"formats and their fields: {known}. Set data.format=NAME and map columns "
                    "with data.columns.FIELD=COLUMN")


def format_named(name: str) -> DataFormat:
    """The registered format called `name` (data.format); DataError naming the choices."""
    if name not in FORMATS:
        raise DataError(f"unknown data.format={name!r}; choose one of auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def converter_for(name: str, columns: Mapping[str, str]) -> RowConverter:
    """The converter of format `name` with the data.columns mapping `columns`."""
    return RowConverter(format_named(name), columns)
