"""Build a wheelhouse for an offline node that already has torch: finetune's wheel and every
dependency it needs, for a target Python and platform, without torch, CUDA, ROCm or Triton.

    python scripts/wheelhouse.py [--out wheelhouse] [--python-version 3.12]
                                 [--platform manylinux_2_28_x86_64 ...] [--extra tensorboard ...]
    make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64 EXTRAS="tensorboard gguf"

Run it where the package index is reachable, copy the folder to the node, and install there:

    pip install --no-index --find-links wheelhouse finetune

pip keeps what the node already has (its torch, transformers, accelerate, peft) wherever the
installed version is within finetune's bounds; the wheels here bring the rest, and bring those
four in range where the node's own versions are not. Steps: build finetune's wheel; resolve the
whole dependency set for the target with `pip install --dry-run --report` (metadata only); then
`pip download --no-deps --only-binary=:all:` every package of it except the GPU stack.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The node's torch brings these; a wheelhouse with them would weigh gigabytes.
GPU_STACK = re.compile(r"^(torch|triton|pytorch-triton(-.+)?|nvidia-.+|cuda-.+|rocm-.+)$")
# Pure-Python dependencies published as source only (hydra-core pins antlr4 4.9.*, which has no
# wheel on PyPI): built into wheels here, so the node needs no build tools.
SOURCE_ONLY = ("antlr4-python3-runtime==4.9.3",)


def canonical(name: str) -> str:
    """A distribution name as the index spells it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def default_platform() -> str:
    """manylinux_2_28 of this machine's architecture: glibc 2.28 or newer, most clusters today."""
    return f"manylinux_2_28_{platform.machine()}"


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip; raise SystemExit with pip's own last lines on failure."""
    command = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"wheelhouse: `pip {args[0]}` failed (exit {proc.returncode}):\n{tail}")
    return proc


def build_finetune_wheel(out: Path) -> Path:
    """finetune's own wheel in `out` (configs and recipes inside, as pyproject ships them)."""
    before = set(out.glob("finetune-*.whl"))
    try:  # the build tools of this environment, if it has them: no index needed
        pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(ROOT))
    except SystemExit:
        pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT))
    built = sorted(set(out.glob("finetune-*.whl")) - before) or sorted(out.glob("finetune-*.whl"))
    return built[-1]


def compatible_platforms(tag: str) -> list[str]:
    """`tag` and the older manylinux tags a node that accepts it accepts too (pip expands only
    the legacy manylinux2014/2010 names itself): manylinux_2_28_x86_64 -> 2_28 ... 2_5."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if match is None:
        return [tag]
    newest, arch = int(match[1]), match[2]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for minor in range(newest, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{arch}")
    return tags


def target_options(python_version: str, platforms: list[str]) -> list[str]:
    options = ["--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp"]
    for tag in dict.fromkeys(t for name in platforms for t in compatible_platforms(name)):
        options += ["--platform", tag]
    return options


def requirement(wheel: Path, extras: list[str]) -> str:
    """What pip resolves and the node installs: finetune's wheel, with its extras if asked."""
    return f"{wheel}[{','.join(extras)}]" if extras else str(wheel)


def install_command(out: Path, extras: list[str]) -> str:
    """The node's install command for a wheelhouse built with `extras`."""
    name = f"'finetune[{','.join(extras)}]'" if extras else "finetune"
    return f"pip install --no-index --find-links {out.name} {name}"


def resolve(wheel: Path, options: list[str], extras: list[str] = ()) -> list[tuple[str, str]]:
    """(name, version) of every distribution finetune (with `extras`) needs on the target,
    itself excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "--target", str(Path(tmp) / "target"), *options, requirement(wheel, list(extras)))
        items = json.loads(report.read_text())["install"]
    found = [(canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in items]
    return sorted((n, v) for n, v in found if n != "finetune")


def build(out: Path, python_version: str, platforms: list[str],
          extras: list[str] = ()) -> dict[str, object]:
    """Fill `out`; returns what it holds and what was left to the node."""
    out.mkdir(parents=True, exist_ok=True)
    wheel = build_finetune_wheel(out)
    pip("wheel", "--no-deps", "--quiet", "-w", str(out), *SOURCE_ONLY)
    options = [*target_options(python_version, platforms), "--find-links", str(out)]
    needed = resolve(wheel, options, extras)
    kept = [f"{n}=={v}" for n, v in needed if not GPU_STACK.match(n)]
    left_to_node = [f"{n}=={v}" for n, v in needed if GPU_STACK.match(n)]
    pip("download", "--no-deps", "--quiet", "-d", str(out), *options, *kept)
    size = sum(p.stat().st_size for p in out.glob("*.whl"))
    return {"finetune": wheel.name, "wheels": len(kept) + 1, "bytes": size,
            "left_to_node": left_to_node}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="the node's Python, e.g. 3.12 (default: this interpreter's)")
    parser.add_argument("--platform", action="append", dest="platforms",
                        help="a wheel platform tag the node accepts (repeatable; default: "
                             f"{default_platform()})")
    parser.add_argument("--extra", action="append", dest="extras", default=[],
                        help="a finetune extra the node needs too, e.g. tensorboard, gguf, "
                             "qlora (repeatable; the GPU stack in it stays out)")
    args = parser.parse_args(argv)
    platforms = args.platforms or [default_platform()]
    result = build(args.out, args.python_version, platforms, args.extras)
    print(f"wheelhouse: {args.out} holds {result['wheels']} wheels, "
          f"{result['bytes'] / 2**20:.1f} MiB, for Python {args.python_version} on "
          f"{', '.join(platforms)}")
    print(f"wheelhouse: left to the node's own install: {', '.join(result['left_to_node'])}")
    print(f"wheelhouse: on the node: {install_command(args.out, args.extras)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
