"""Every data format, auto detection and column mapping, end to end through build_data."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data import DataError, build_data
from finetune.data.errors import BadRow
from finetune.data.formats import FORMATS, converter_for, detect_format


def _build(cfg, tokenizer):
    return build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=1)


def _trained_text(tokenizer, data, i: int = 0) -> str:
    ids, trained = data.preview(i + 1)[i]
    return tokenizer.decode(np.asarray(ids)[np.asarray(trained)].tolist())


def _full_text(tokenizer, data, i: int = 0) -> str:
    ids, _ = data.preview(i + 1)[i]
    return tokenizer.decode(np.asarray(ids).tolist())


ROWS = {
    "alpaca": {"instruction": "Add two and two.", "input": "2 + 2", "output": "Four."},
    "chat": {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Add two and two."},
                          {"role": "assistant", "content": "Four."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Add two and two."},
                                   {"from": "gpt", "value": "Four."}]},
    "text": {"text": "Four is two and two."},
    "prompt_completion": {"prompt": "Two and two make", "completion": " four."},
    "preference": {"prompt": "Two and two make", "chosen": " four.", "rejected": " five."},
}
TRAINED = {"alpaca": "Four.<|end|>", "chat": "Four.<|end|>", "sharegpt": "Four.<|end|>",
           "text": "Four is two and two.<|end|>",  # BOS (the first token) is never a target
           "prompt_completion": " four.<|end|>", "preference": " four.<|end|>"}


@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("declared", ["auto", "explicit"])
def test_each_format_trains_exactly_its_answer(name, declared, tokenizer, data_cfg, jsonl):
    path = jsonl([ROWS[name]] * 3)
    cfg = data_cfg(path=str(path), format="auto" if declared == "auto" else name)
    data = _build(cfg, tokenizer)
    assert data.stats.format == name
    assert data.stats.rows == 3
    assert _trained_text(tokenizer, data) == TRAINED[name]


def test_text_is_bos_text_eos(tokenizer, data_cfg, jsonl):
    path = jsonl([{"text": "hello world"}])
    ids, trained = _build(data_cfg(path=str(path)), tokenizer).preview(1)[0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1].tolist()) == "hello world"
    assert trained[1:].all() and not trained[0]


def test_chat_renders_system_user_and_assistant(tokenizer, data_cfg, jsonl):
    path = jsonl([ROWS["chat"]])
    text = _full_text(tokenizer, _build(data_cfg(path=str(path)), tokenizer))
    assert text == ("<|begin|><|system|>\nBe brief.<|end|>\n<|user|>\nAdd two and two.<|end|>\n"
                    "<|assistant|>\nFour.<|end|>\n")


def test_sharegpt_roles_map_to_chat_roles():
    example = converter_for("sharegpt", {})({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A"}]})
    assert example.messages == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_sharegpt_unknown_speaker_is_named():
    with pytest.raises(BadRow, match="from='robot'"):
        converter_for("sharegpt", {})({"conversations": [{"from": "robot", "value": "x"}]})


def test_alpaca_input_is_appended_to_the_instruction():
    example = converter_for("alpaca", {})(ROWS["alpaca"])
    assert example.messages == [("user", "Add two and two.\n\n2 + 2"), ("assistant", "Four.")]


def test_preference_keeps_the_rejected_answer():
    example = converter_for("preference", {})(ROWS["preference"])
    assert example.segments == [("Two and two make", False), (" four.", True)]
    assert example.rejected.segments == [("Two and two make", False), (" five.", True)]


def test_conversational_prompt_completion_uses_the_template(tokenizer, data_cfg, jsonl):
    row = {"prompt": [{"role": "user", "content": "Hi"}],
           "completion": [{"role": "assistant", "content": "Hello"}]}
    path = jsonl([row])
    data = _build(data_cfg(path=str(path)), tokenizer)
    assert data.stats.format == "prompt_completion"
    assert _trained_text(tokenizer, data) == "Hello<|end|>"
    assert "<|user|>" in _full_text(tokenizer, data)


def test_column_mapping_reads_renamed_fields(tokenizer, data_cfg, jsonl):
    rows = [{"question": "Add two and two.", "answer": "Four."}] * 2
    path = jsonl(rows)
    cfg = data_cfg(path=str(path), columns={"instruction": "question", "output": "answer"})
    data = _build(cfg, tokenizer)
    assert data.stats.format == "alpaca"  # auto detection sees the mapped names
    assert _trained_text(tokenizer, data) == "Four.<|end|>"


def test_column_mapping_rejects_a_field_the_format_does_not_read():
    with pytest.raises(DataError, match="data.columns has answer.*instruction, output"):
        converter_for("alpaca", {"answer": "x"})


def test_detection_order_and_failure_message():
    assert detect_format([{"messages": []}], {}, "f") == "chat"
    assert detect_format([{"prompt": "a", "chosen": "b", "rejected": "c"}], {}, "f") == "preference"
    assert detect_format([{"prompt": "a", "completion": "b"}], {}, "f") == "prompt_completion"
    with pytest.raises(DataError) as err:
        detect_format([{"foo": 1, "bar": 2}], {}, "data.jsonl")
    message = str(err.value)
    assert "data.jsonl" in message and "foo, bar" in message
    assert all(name in message for name in FORMATS) and "data.format" in message


def test_unknown_format_is_an_error(tokenizer, data_cfg, jsonl):
    path = jsonl([ROWS["text"]])
    with pytest.raises(DataError, match="unknown data.format='wiki'"):
        _build(data_cfg(path=str(path), format="wiki"), tokenizer)


def test_conversation_without_assistant_turn(tokenizer, data_cfg, jsonl):
    rows = [ROWS["chat"], {"messages": [{"role": "user", "content": "Hi"}]}]
    path = jsonl(rows)
    with pytest.raises(DataError, match=r"d.jsonl:2: the conversation has no assistant turn"):
        _build(data_cfg(path=str(path)), tokenizer)
    data = _build(data_cfg(path=str(path), on_bad_row="skip"), tokenizer)
    assert data.stats.skipped_rows == 1
    assert data.stats.skip_reasons == {"no_assistant_turn": 1}


def test_role_the_template_does_not_know(tokenizer, data_cfg, jsonl):
    rows = [ROWS["chat"], {"messages": [{"role": "tool", "content": "42"},
                                        {"role": "assistant", "content": "ok"}]}]
    path = jsonl(rows)
    with pytest.raises(DataError, match=r"d.jsonl:2: the chat template rejected .*unknown role: tool"):
        _build(data_cfg(path=str(path)), tokenizer)
    data = _build(data_cfg(path=str(path), on_bad_row="skip"), tokenizer)
    assert (data.stats.rows, data.stats.skipped_rows) == (1, 1)
