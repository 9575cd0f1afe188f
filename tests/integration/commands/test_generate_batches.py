"""`finetune generate --prompts FILE`: prompts run in left-padded batches (`--batch-size`) with
the completions of one prompt at a time, in the file's order, repeatable under a seed; an empty
file and an `--out` that cannot be written are refused before any model is loaded, and a failure
leaves an existing `--out` file as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune.cli import dispatch, main
from finetune.errors import ConfigError

PROMPTS = [
    "Name a fruit.",
    "Write the number in words, then say which numbers come right before and after it.\n\n7",
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Name a colour."}]},
    "x",
    "Give the opposite of the word.\n\nhot",
]
SAMPLED = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "11"]


def write_prompts(path: Path, prompts: list) -> Path:
    path.write_text("".join(json.dumps(p if isinstance(p, dict) else {"prompt": p}) + "\n"
                            for p in prompts), encoding="utf-8")
    return path


def completions(capsys, model: Path, prompts: Path, *args: str) -> list[str]:
    assert dispatch(["generate", str(model), "--prompts", str(prompts),
                     "--max-new-tokens", "8", *args]) == 0
    return [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]


@pytest.fixture
def generate_calls(monkeypatch) -> list[int]:
    """The batch size of every `model.generate` call."""
    from transformers import GenerationMixin

    calls: list[int] = []
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def test_greedy_batches_give_the_completions_of_one_prompt_at_a_time(
        capsys, tiny_model_dir: Path, tmp_path: Path, generate_calls: list[int]) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    one_at_a_time = completions(capsys, tiny_model_dir, prompts, "--batch-size", "1")
    assert generate_calls == [1] * 5
    generate_calls.clear()
    batched = completions(capsys, tiny_model_dir, prompts, "--batch-size", "3")
    assert generate_calls == [3, 2]  # left-padded: the prompts differ in length
    assert batched == one_at_a_time and len(set(batched)) > 1


def test_a_sampled_completion_depends_on_its_prompt_and_seed_only(
        capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    batched = completions(capsys, tiny_model_dir, prompts, *SAMPLED, "--batch-size", "3")
    assert batched[0] == batched[2]  # the same prompt, other neighbours' draws do not matter
    assert completions(capsys, tiny_model_dir, prompts, *SAMPLED, "--batch-size", "1") == batched
    assert dispatch(["generate", str(tiny_model_dir), "--prompt", PROMPTS[0],
                     "--max-new-tokens", "8", *SAMPLED]) == 0
    assert capsys.readouterr().out.strip() == batched[0].strip()  # --prompt streams the same
    other_seed = completions(capsys, tiny_model_dir, prompts, *SAMPLED[:-1], "12")
    assert other_seed != batched


def test_left_padding_under_the_padding_free_attention(tiny_model_dir: Path) -> None:
    """sdpa_varlen runs a padded batch as one masked SDPA call: left padding must not change
    what a prompt generates."""
    from transformers import AutoModelForCausalLM

    from finetune.evaluate import Sampling, generate_text, generate_texts
    from finetune.kernels.varlen_sdpa import VARLEN_SDPA, register_varlen_sdpa
    from finetune.models.tiny import build_tiny_tokenizer

    register_varlen_sdpa()
    tokenizer = build_tiny_tokenizer()
    sampling = Sampling(max_new_tokens=8)
    prompts = [p if isinstance(p, str) else p["messages"] for p in PROMPTS]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    expected = [generate_text(plain, tokenizer, p, sampling) for p in prompts]
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                  attn_implementation=VARLEN_SDPA).eval()
    batches = list(generate_texts(varlen, tokenizer, prompts, sampling, batch_size=4))
    assert [len(b) for b in batches] == [4, 1]
    assert [text for batch in batches for text in batch] == expected


def test_an_empty_prompts_file_is_refused_naming_it(capsys, tmp_path: Path) -> None:
    for text in ("", "\n  \n\n"):
        empty = tmp_path / "prompts.jsonl"
        empty.write_text(text, encoding="utf-8")
        assert main(["generate", "not-loaded", "--prompts", str(empty)]) == 2
        err = capsys.readouterr().err
        assert f"--prompts {empty}: the file holds no prompt" in err
        assert "Traceback" not in err


@pytest.mark.parametrize("where", ["missing-folder", "under-a-file", "proc", "folder"])
def test_an_out_that_cannot_be_written_is_refused_before_loading(
        capsys, tmp_path: Path, where: str) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:1])
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    out = {"missing-folder": tmp_path / "nowhere" / "out.jsonl",
           "under-a-file": tmp_path / "notes.txt" / "out.jsonl",
           "proc": Path("/proc/finetune-out.jsonl"), "folder": tmp_path}[where]
    before = sorted(tmp_path.iterdir())
    # "not-loaded" is not a model: reaching the loader would fail with another message
    assert main(["generate", "not-loaded", "--prompts", str(prompts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "Traceback" not in err and "not-loaded" not in err
    assert sorted(tmp_path.iterdir()) == before


def test_a_failure_leaves_an_existing_out_file_as_it_was(
        capsys, monkeypatch, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import GenerationMixin

    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier completions\n", encoding="utf-8")
    real = GenerationMixin.generate
    calls = []

    def fail_on_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        dispatch(["generate", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
                  "--max-new-tokens", "4", "--batch-size", "2"])
    assert out.read_text(encoding="utf-8") == "earlier completions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]
    monkeypatch.setattr(GenerationMixin, "generate", real)
    assert dispatch(["generate", str(tiny_model_dir), "--prompts", str(prompts), "--out",
                     str(out), "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(PROMPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes


def test_a_batch_size_below_one_is_refused_before_loading() -> None:
    with pytest.raises(ConfigError, match="--batch-size=0 must be at least 1"):
        dispatch(["generate", "not-loaded", "--prompts", "p.jsonl", "--batch-size", "0"])
