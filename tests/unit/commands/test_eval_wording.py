"""`finetune eval` says what it evaluates: the rows of the file it scores, not "training
examples" and the same rows again as "held out"."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from finetune.cli import dispatch


def test_eval_of_a_file_logs_only_the_rows_it_evaluates(capsys, caplog, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    rows = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."}
            for i in range(12)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    caplog.set_level(logging.INFO, logger="finetune.data.in_memory")
    assert dispatch(["eval", str(tiny_model_dir), f"data.path={path}",
                     f"data.cache_dir={tmp_path / 'cache'}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (line,) = [r.getMessage() for r in caplog.records
               if r.name == "finetune.data.in_memory" and r.getMessage().startswith("data:")]
    assert "training" not in line and "held out" not in line
    assert re.search(rf"\b12 examples to evaluate \({report['tokens']} tokens, "
                     rf"{report['trained_tokens']} trained\); of 12 rows read:", line), line
