"""scripts/bench_matmul.py: shapes are parsed or refused, and the JSON line carries both dtypes'
rates and their ratio for each shape."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import bench_matmul  # noqa: E402


def test_shapes_are_parsed_and_bad_ones_refused() -> None:
    assert bench_matmul.parse_shapes("2x3x4,8x8x8") == [(2, 3, 4), (8, 8, 8)]
    for bad in ("2x3", "2x0x4", "axbxc"):
        with pytest.raises(argparse.ArgumentTypeError, match="MxKxN"):
            bench_matmul.parse_shapes(bad)


def test_prints_rates_and_their_ratio_per_shape(capsys) -> None:
    assert bench_matmul.main(["--shapes", "256x128x192,128x128x128", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    found = json.loads(lines[-1])["shapes"]
    assert set(found) == {"256x128x192", "128x128x128"}
    for rates in found.values():
        bf16, fp32 = rates["bf16_gflops"], rates["fp32_gflops"]
        assert bf16 > 0.005 and fp32 > 0.005
        # The ratio is of the rates measured; the printed rates are rounded to 0.005 either
        # way, so it lies between the ratios their rounding allows (and is itself rounded).
        assert ((bf16 - 0.005) / (fp32 + 0.005) - 0.0005 <= rates["bf16_over_fp32"]
                <= (bf16 + 0.005) / (fp32 - 0.005) + 0.0005)
    assert lines[0].startswith("256x128x192: bf16 ")
