"""`finetune generate`: the chat template, sampling that a seed makes repeatable, prompts from a
file written as JSON lines, the interactive loop, streaming, and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.cli import dispatch
from finetune.errors import ConfigError
from finetune.evaluate import Sampling, prompt_ids
from finetune.models.tiny import build_tiny_tokenizer

SAMPLED = ["--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "0.95"]


def generate(capsys, *args: str) -> str:
    assert dispatch(["generate", *args]) == 0
    return capsys.readouterr().out


def test_the_prompt_is_a_user_turn_with_the_assistant_header_after_it() -> None:
    tokenizer = build_tiny_tokenizer()
    text = tokenizer.decode(prompt_ids(tokenizer, "Name a fruit.")[0])
    assert text == "<|begin|><|user|>\nName a fruit.<|end|>\n<|assistant|>\n"
    raw = tokenizer.decode(prompt_ids(tokenizer, "Name a fruit.", chat=False)[0])
    assert "<|user|>" not in raw and raw.endswith("Name a fruit.")
    builtin = tokenizer.decode(prompt_ids(tokenizer, "Hi", template="{{ messages[0]['content'] }}"
                                          "{% if add_generation_prompt %}!{% endif %}")[0])
    assert builtin == "Hi!"


def test_the_same_seed_gives_the_same_sample(capsys, tiny_model_dir: Path) -> None:
    first = generate(capsys, str(tiny_model_dir), "--prompt", "Name a fruit.", *SAMPLED,
                     "--seed", "7")
    again = generate(capsys, str(tiny_model_dir), "--prompt", "Name a fruit.", *SAMPLED,
                     "--seed", "7")
    other = generate(capsys, str(tiny_model_dir), "--prompt", "Name a fruit.", *SAMPLED,
                     "--seed", "8")
    assert first.strip() and first == again
    assert other != first  # a random tiny model at temperature 1: another seed, another text


def test_prompts_file_gives_one_json_line_each(capsys, tiny_model_dir: Path,
                                               tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n\n"Say hi."\n'
                       '{"messages": [{"role": "user", "content": "Name a fruit."}]}\n',
                       encoding="utf-8")
    out = tmp_path / "out.jsonl"
    generate(capsys, str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
             "--max-new-tokens", "8")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == [
        "Name a fruit.", "Say hi.", [{"role": "user", "content": "Name a fruit."}]]
    assert all(isinstance(r["completion"], str) for r in records)
    assert records[0]["completion"] == records[2]["completion"]  # the same conversation, greedy
    to_stdout = generate(capsys, str(tiny_model_dir), "--prompts", str(prompts),
                         "--max-new-tokens", "8")
    assert [json.loads(line) for line in to_stdout.splitlines()] == records


def test_a_bad_prompt_line_names_the_file_and_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"question": "no"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: needs a \"prompt\""):
        dispatch(["generate", str(tiny_model_dir), "--prompts", str(prompts)])


def test_interactive_keeps_the_conversation_until_reset(capsys, monkeypatch,
                                                        tiny_model_dir: Path) -> None:
    import finetune.evaluate as evaluate

    seen = []
    original = evaluate.generate_text

    def spy(model, tokenizer, prompt, sampling, **kwargs):
        seen.append(prompt if isinstance(prompt, str) else [m["content"] for m in prompt])
        return original(model, tokenizer, prompt, sampling, **kwargs)

    monkeypatch.setattr(evaluate, "generate_text", spy)
    lines = iter(["Hi", "And again?", "/reset", "New start", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert dispatch(["generate", str(tiny_model_dir), "--interactive",
                     "--max-new-tokens", "4"]) == 0
    assert [s[0::2] for s in seen] == [["Hi"], ["Hi", "And again?"], ["New start"]]
    assert len(seen[1]) == 3  # the first reply is part of the second prompt


def test_a_single_prompt_is_streamed(capsys, monkeypatch, tiny_model_dir: Path) -> None:
    from transformers import TextStreamer

    pieces = []
    real_put = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        pieces.append(text)
        real_put(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    out = generate(capsys, str(tiny_model_dir), "--prompt", "Name a fruit.",
                   "--max-new-tokens", "6")
    assert pieces and "".join(pieces).strip() == out.strip()


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "-1"], "--temperature=-1.0 must be 0"),
    (["--top-p", "0"], "--top-p=0.0 must be in"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be at least 1"),
    (["--out", "x.jsonl"], "--out goes with --prompts"),
])
def test_bad_options_are_refused_before_loading(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dispatch(["generate", "does-not-matter", "--prompt", "x", *args])


def test_a_folder_that_is_not_a_model_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a model: it has no config.json") as err:
        dispatch(["generate", str(tmp_path), "--prompt", "x"])
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError, match="is not a folder"):
        dispatch(["generate", str(tmp_path / "missing"), "--prompt", "x"])


def test_sampling_defaults_are_greedy() -> None:
    assert Sampling().temperature == 0.0 and Sampling().seed == 0


def test_samples_during_training_are_written_every_n_steps(tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    """The helper a training run calls after each step (eval.generate_every_n_steps)."""
    from transformers import AutoModelForCausalLM

    from finetune.evaluate import SampleWriter, generate_text

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    tokenizer = build_tiny_tokenizer()
    path = tmp_path / "samples.jsonl"
    sampling = Sampling(max_new_tokens=5)
    writer = SampleWriter(path, ["Name a fruit.", "Say hi."], every_n_steps=2, sampling=sampling)
    assert writer.maybe_write(1, model, tokenizer) is None and not path.exists()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    records = writer.maybe_write(2, model, tokenizer)
    assert torch.equal(torch.rand(3), expected_draw)  # training's random stream is untouched
    writer.maybe_write(4, model, tokenizer)
    assert model.training  # put back in training mode
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["step"], r["prompt"]) for r in lines] == [
        (2, "Name a fruit."), (2, "Say hi."), (4, "Name a fruit."), (4, "Say hi.")]
    assert records == lines[:2]
    assert lines[0]["completion"] == generate_text(model.eval(), tokenizer, "Name a fruit.",
                                                   sampling)
    silent = SampleWriter(tmp_path / "other.jsonl", ["x"], every_n_steps=1, sampling=sampling,
                          write=False)
    assert silent.maybe_write(1, model, tokenizer) and not (tmp_path / "other.jsonl").exists()
