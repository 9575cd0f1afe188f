"""scripts/bench_layout.py on the small model and short rows (`--size smoke`): the layouts of a
mode hold the same trained tokens and give the same losses (peft's LoRA forward and the fused one
too), and the JSON line carries a ratio for each comparison. In-process, but six models and a
profiled run take tens of seconds, so it lives with the end-to-end tests."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests._cli import REPO

SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_layout  # noqa: E402

pytestmark = pytest.mark.slow


def test_small_run_compares_the_layouts_on_the_same_examples(capsys) -> None:
    assert bench_layout.main(["--size", "smoke", "--steps", "2", "--repeats", "1",
                              "--profile"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    found = json.loads(lines[-1])
    tokens = found["trained_tokens"]
    names = list(bench_layout.LAYOUTS)
    assert tokens[names[0]] == tokens[names[1]] and tokens[names[2]] == tokens[names[3]]
    assert tokens[bench_layout.PEFT_FORWARD] == tokens[names[3]]
    assert len(found["ratios"]) == 4 and all(r > 0 for r in found["ratios"].values())
    differences = [float(m) for m in re.findall(r"loss difference ([0-9.e+-]+)", "\n".join(lines))]
    assert len(differences) == 4 and max(differences) < 1e-4
    shares = found["op_shares"]
    # One profiled run: its ops and what ran outside them make up its whole wall time.
    assert abs(sum(shares.values()) - 100) < 1e-6 and shares["outside aten ops"] >= 0
    assert shares["matrix products"] > 10 and shares["SDPA"] > 0
