"""`finetune eval`: the loss is the training objective on rows templated and masked as in
training; which rows are evaluated (a run's held-out rows, or every row of data.path); and the
refusals of bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.cli import dispatch
from finetune.commands.eval import eval_data_config
from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.errors import ConfigError
from finetune.evaluate import evaluate_loss
from finetune.models.tiny import build_tiny_tokenizer


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    rows = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."}
            for i in range(10)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loss_equals_the_models_own_loss_over_the_trained_tokens(tiny_model_dir: Path,
                                                                 rows_file: Path,
                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    cfg = DataConfig(path=str(rows_file), val_path=str(rows_file), max_seq_len=64,
                     cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, tokenizer, attention="sdpa", seed=0, micro_batch_size=10,
                      held_out_apart=False)  # as `finetune eval` does
    (batch,) = data.val_batches()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    result = evaluate_loss(model, [batch], torch.device("cpu"))
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items()}).loss.item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.rows == 10 and result.tokens == int(batch["attention_mask"].sum())
    assert result.trained_tokens == data.stats.trained_tokens


def test_every_row_of_data_path_is_evaluated(capsys, tiny_model_dir: Path, rows_file: Path,
                                             tmp_path: Path) -> None:
    assert dispatch(["eval", str(tiny_model_dir), f"data.path={rows_file}",
                     f"data.cache_dir={tmp_path / 'cache'}", "--json", "--batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "model" and report["rows"] == 10
    assert report["data"] == f"every row of {rows_file}"
    assert report["loss"] > 0 and report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert dispatch(["eval", str(tiny_model_dir), f"data.path={rows_file}",
                     f"data.cache_dir={tmp_path / 'cache'}", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "rows 10" in text and f"perplexity {report['perplexity']:.3f}" in text


def test_a_run_is_evaluated_on_its_held_out_rows(capsys, tiny_model_dir: Path, rows_file: Path,
                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")  # a full fine-tune's final/
    (run / "config.yaml").write_text(
        f"data:\n  path: {rows_file}\n  val_split: 0.2\n  max_seq_len: 64\n"
        f"  cache_dir: {tmp_path / 'cache'}\n", encoding="utf-8")
    assert dispatch(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "run" and report["rows"] == 2
    assert report["data"].startswith("the run's held-out rows (data.val_split=0.2")


def test_data_settings_come_from_the_run_and_the_overrides() -> None:
    run = {"data": {"path": "train.jsonl", "val_split": 0.1, "max_seq_len": 128,
                    "packing": True}}
    cfg, what = eval_data_config(run, [])
    assert cfg.max_seq_len == 128 and not cfg.packing and "held-out" in what
    cfg, what = eval_data_config(run, ["data.path=test.jsonl", "data.max_seq_len=64"])
    assert (cfg.path, cfg.val_path, cfg.max_seq_len) == ("test.jsonl", "test.jsonl", 64)
    cfg, what = eval_data_config(None, ["data.path=a.jsonl", "data.val_path=b.jsonl"])
    assert what == "every row of b.jsonl"


@pytest.mark.parametrize(("run", "overrides", "message"), [
    (None, [], "give the data to evaluate on: data.path=FILE"),
    (None, ["trainer.max_steps=3"], "data.KEY=VALUE overrides only"),
    (None, ["data.pathh=x"], "bad data override"),
    (None, ["data.path=x", "data.truncation=cut"], "bad data override"),
    ({"data": {"path": "t.jsonl", "val_split": 0.0}}, [], "the run held out no rows"),
])
def test_bad_data_settings_are_refused(run, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        eval_data_config(run, overrides)


def test_a_folder_that_is_not_a_model_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a model") as err:
        dispatch(["eval", str(tmp_path), "data.path=x.jsonl"])
    assert err.value.exit_code == 2


def test_examples_are_counted_in_padded_packed_and_padding_free_rows() -> None:
    from finetune.data.collate import Collator
    from finetune.evaluate.perplexity import scored_document_lengths

    def doc(n: int, trained: bool):
        return np.arange(3, 3 + n), np.array([0] + [int(trained)] * (n - 1))

    docs = [doc(4, True), doc(6, False), doc(3, True)]  # the second has no trained token
    padded = Collator(pad_id=0, isolation=None)([[d] for d in docs])
    flat = Collator(pad_id=0, isolation="varlen")([[d] for d in docs])
    packed = Collator(pad_id=0, isolation="block_mask_4d")([docs[:2], docs[2:]])
    for batch in (padded, flat, packed):
        assert sorted(scored_document_lengths(batch)) == [3, 4]


def test_eval_scores_padding_free_rows_where_the_plan_s_attention_keeps_them_apart(
        capsys, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, rows_file: Path,
        tmp_path: Path) -> None:
    """On a CPU the plan's attention is sdpa_varlen, so eval scores padding-free rows; forced to
    padded sdpa rows, the same examples give the same loss and counts."""
    import finetune.commands.eval as eval_command

    args = ["eval", str(tiny_model_dir), f"data.path={rows_file}",
            f"data.cache_dir={tmp_path / 'cache'}", "--json", "--batch-size", "4"]
    assert dispatch(args) == 0
    free = json.loads(capsys.readouterr().out)
    assert free["attention"] == "sdpa_varlen" and free["padding_free"] is True
    monkeypatch.setattr(eval_command, "eval_attention", lambda: "sdpa")
    assert dispatch(args) == 0
    padded = json.loads(capsys.readouterr().out)
    assert padded["attention"] == "sdpa" and padded["padding_free"] is False
    assert (free["rows"], free["tokens"], free["trained_tokens"]) == (
        padded["rows"], padded["tokens"], padded["trained_tokens"])
    assert free["loss"] == pytest.approx(padded["loss"], rel=1e-5)
