"""Mutation testing of the modules that carry the README's promises: `make mutants`.

Each mutant is one small change to one module (a curated, high-value change from
scripts/mutants_catalog.py, or a generic operator: a comparison flipped, `and`/`or` swapped, a
slice bound moved by one, a call statement dropped). It is applied in a private copy of the
repository (never in this working tree), and only the tests that cover that module run against
it, stopping at the first failure, under a timeout (3 times the suite's unmutated time, at least
--timeout). A mutant that no test notices is a survivor: either a hole in the tests, or an
equivalent mutant whose reason is written in scripts/mutants_allowed.toml (file, line,
mutation, why).

    python scripts/mutants.py                 # every module in the catalog
    python scripts/mutants.py --module loss   # modules whose path contains "loss"
    python scripts/mutants.py --list          # the mutants, without running anything

Exit status: 0 when every mutant was killed or is explained, 1 when an unexplained survivor
remains or a module's tests fail unmutated, 2 when the catalog no longer matches the code.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants_catalog import CANARY, CURATED, MODULES, Curated  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = Path(__file__).resolve().parent / "mutants_allowed.toml"
# Packages that live outside finetune/ (pyproject's [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"recipes": "recipes", "configs": "configs"}
_FLIP = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In}


class CatalogError(Exception):
    """The catalog names code that is no longer there (exit 2)."""


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to the repository root
    line: int
    mutation: str  # what changed, as shown and as matched against the allow-list
    source: str  # the whole mutated module
    tests: tuple[str, ...]


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def curated_mutant(entry: Curated, original: str) -> Mutant:
    count = original.count(entry.find)
    if count != 1:
        raise CatalogError(f"{entry.path}: {entry.find!r} occurs {count} times (expected once); "
                           "update scripts/mutants_catalog.py to the code as it is now")
    at = original.index(entry.find)
    line = original.count("\n", 0, at) + 1 + len(entry.find) - len(entry.find.lstrip("\n"))
    mutation = f"{_short(entry.find)} -> {_short(entry.replace) or '(removed)'}"
    tests = entry.tests or MODULES[entry.path]["tests"]
    source = original.replace(entry.find, entry.replace)
    try:
        ast.parse(source)
    except SyntaxError as exc:  # a mutant that does not compile would count as killed
        raise CatalogError(f"{entry.path}:{line}: {mutation} gives invalid code ({exc})") from None
    return Mutant(entry.path, line, mutation, source, tuple(tests))


def _offset(lines: list[str], line: int, col: int) -> int:
    return sum(len(text) for text in lines[:line - 1]) + len(lines[line - 1].encode()[:col].decode())


def _generic_candidates(source: str, functions: list[str]) -> list[tuple[ast.AST, str, str]]:
    """(node, old text, new text) for each generic mutation inside `functions` (qualified as
    `name` or `Class.name`)."""
    tree = ast.parse(source)
    found: list[tuple[ast.AST, str, str]] = []

    def visit(node: ast.AST, qual: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = qual
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{qual}.{child.name}" if qual else child.name
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    name in functions or child.name in functions):
                found.extend(_mutations_in(child))
            else:
                visit(child, name)

    visit(tree, "")
    return sorted(found, key=lambda f: (f[0].lineno, f[0].col_offset, f[2]))


def _mutations_in(function: ast.AST) -> list[tuple[ast.AST, str, str]]:
    out = []
    for node in ast.walk(function):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIP:
            flipped = ast.Compare(node.left, [_FLIP[type(node.ops[0])]()], node.comparators)
            out.append((node, ast.unparse(node), ast.unparse(flipped)))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            out.append((node, ast.unparse(node), ast.unparse(ast.BoolOp(other, node.values))))
        elif isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper):
                if bound is not None:
                    text = ast.unparse(bound)
                    out.append((bound, text, f"({text}) + 1"))
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
              and not ast.unparse(node.value.func).startswith("logger.")):
            out.append((node.value, ast.unparse(node.value), "None"))
    return out


def generic_mutants(path: str, original: str, functions: list[str], limit: int,
                    tests: list[str]) -> list[Mutant]:
    """Up to `limit` generic mutants, spread evenly over the candidates (deterministic)."""
    candidates = _generic_candidates(original, functions)
    if limit <= 0 or not candidates:
        return []
    step = len(candidates) / min(limit, len(candidates))
    picked = [candidates[int(i * step)] for i in range(min(limit, len(candidates)))]
    lines = original.splitlines(keepends=True)
    mutants = []
    for node, old, new in picked:
        start = _offset(lines, node.lineno, node.col_offset)
        end = _offset(lines, node.end_lineno, node.end_col_offset)
        mutated = original[:start] + f"({new})" + original[end:]
        ast.parse(mutated)  # an operator must give valid code
        mutants.append(Mutant(path, node.lineno, f"{_short(old)} -> {_short(new)}", mutated,
                              tuple(tests)))
    return mutants


def all_mutants(modules: list[str], base: Path) -> list[Mutant]:
    """The mutants of `modules` as they are in the copy `base`."""
    out = []
    for path in modules:
        spec = MODULES[path]
        original = (base / path).read_text(encoding="utf-8")
        out += [curated_mutant(e, original) for e in CURATED if e.path == path]
        out += generic_mutants(path, original, spec.get("functions", []), spec.get("generic", 0),
                               spec["tests"])
    return out


def load_allowed() -> dict[tuple[str, str], str]:
    data = tomllib.loads(ALLOWED.read_text(encoding="utf-8")) if ALLOWED.is_file() else {}
    return {(e["file"], e["mutation"]): e["why"] for e in data.get("equivalent", [])}


def private_copy(source: str) -> Path:
    """A copy of the repository outside this working tree: HEAD, or the tracked files as they
    are now (`worktree`)."""
    copy = Path(tempfile.mkdtemp(prefix="finetune-mutants-"))
    if source == "head":
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    else:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, names):
            if (ROOT / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, copy / name)
    # The editable install maps finetune.recipes and finetune.configs to this working tree's
    # recipes/ and configs/ (pyproject's package-dir). Links inside the copy's finetune/ are
    # found first on its path, so the copy's recipes (and their mutants) are the ones imported.
    for package, folder in PACKAGE_DIRS.items():
        (copy / "finetune" / package).symlink_to(Path("..") / folder, target_is_directory=True)
    return copy


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """'killed', 'survived' or 'timeout', the seconds taken and the output's tail. The copy
    comes first on the path of this process and of any process it starts (the CLI, torchrun),
    and no bytecode is cached, so a mutant is never hidden by the installed package or a stale
    .pyc."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    # 1: a test failed; 2-4: collection or usage failed (e.g. the mutant broke an import).
    return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - start, tail


def check_imports_copy(copy: Path) -> None:
    """Stop unless finetune and the packages outside finetune/ are imported from the copy."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    names = ["finetune", *(f"finetune.{p}" for p in PACKAGE_DIRS)]
    code = ("import importlib\n"
            f"for name in {names!r}:\n"
            "    print(name, list(importlib.import_module(name).__path__)[0])")
    where = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True,
                           text=True, check=True)
    for line in where.stdout.splitlines():
        name, folder = line.split(" ", 1)
        if not Path(folder).resolve().is_relative_to(copy.resolve()):
            sys.exit(f"mutants: the copy in {copy} imports {name} from {folder}; its mutants "
                     "would not be tested. Stopping.")


def _remove(copies: Queue[Path]) -> None:
    while not copies.empty():
        shutil.rmtree(copies.get(), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", default=[],
                        help="only modules whose path contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="mutants run at once, one private copy each (default: 2)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per unmutated suite and, at least, per mutant (a mutant "
                             "also gets 3 times its suite's unmutated time)")
    parser.add_argument("--source", choices=("head", "worktree"), default="head",
                        help="mutate HEAD (default) or the tracked files as they are now")
    args = parser.parse_args(argv)

    modules = [m for m in MODULES if not args.module or any(s in m for s in args.module)]
    started = time.monotonic()
    copies: Queue[Path] = Queue()
    for _ in range(1 if args.list else max(args.jobs, 1)):
        copies.put(private_copy(args.source))
    first = copies.queue[0]
    try:
        mutants = all_mutants(modules, first)
        canary = curated_mutant(CANARY, (first / CANARY.path).read_text(encoding="utf-8"))
    except CatalogError as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        _remove(copies)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.path}:{m.line}  {m.mutation}  [{' '.join(m.tests)}]")
        print(f"{len(mutants)} mutants in {len(modules)} modules")
        _remove(copies)
        return 0

    allowed = load_allowed()
    check_imports_copy(first)
    print(f"mutants: {len(mutants)} in {len(modules)} modules, copies under {first.parent}, "
          f"{args.jobs} at a time", flush=True)

    limits: dict[tuple[str, ...], float] = {}

    def run(mutant: Mutant | None, tests: tuple[str, ...] = ()) -> tuple[str, float, str]:
        copy = copies.get()
        try:
            target = copy / mutant.path if mutant else None
            original = target.read_text(encoding="utf-8") if target else ""
            if target:
                target.write_text(mutant.source, encoding="utf-8")
            try:
                tests = mutant.tests if mutant else tests
                return run_tests(copy, tests, limits.get(tests, args.timeout))
            finally:
                if target:
                    target.write_text(original, encoding="utf-8")
        finally:
            copies.put(copy)

    try:
        verdict, seconds, _ = run(canary)
        print(f"canary   {canary.path}:{canary.line}  {canary.mutation}  {verdict} "
              f"({seconds:.0f} s)", flush=True)
        if verdict != "killed":
            print("mutants: the canary survived, so mutants are not what the tests import. "
                  "Stopping.", file=sys.stderr)
            return 1
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            suites = sorted({m.tests for m in mutants})
            broken = []
            for tests, (verdict, seconds, tail) in zip(
                    suites, pool.map(lambda t: run(None, t), suites), strict=True):
                # A survivor runs the whole suite: give it three times the unmutated run.
                limits[tests] = max(args.timeout, 3 * seconds)
                if verdict != "survived":
                    broken.append(tests)
                    how = "timed out" if verdict == "timeout" else "failed"
                    print(f"baseline {how} unmutated after {seconds:.0f} s, its mutants are not "
                          f"run: {' '.join(tests)}\n{tail}", flush=True)
            todo = [m for m in mutants if m.tests not in broken]
            results = []
            for m, (verdict, seconds, _) in zip(todo, pool.map(run, todo), strict=True):
                why = allowed.get((m.path, m.mutation)) if verdict == "survived" else None
                shown = "equivalent" if why else verdict
                print(f"{shown:<10} {m.path}:{m.line}  {m.mutation}  ({seconds:.0f} s)",
                      flush=True)
                results.append((m, verdict, why))
    finally:
        _remove(copies)

    survivors = [(m, why) for m, v, why in results if v == "survived"]
    unexplained = [m for m, why in survivors if not why]
    killed = sum(v in ("killed", "timeout") for _, v, _ in results)
    skipped = sum(m.tests in broken for m in mutants)
    timeouts = sum(v == "timeout" for _, v, _ in results)
    minutes = (time.monotonic() - started) / 60
    print(f"\n{len(results)} mutants: {killed} killed ({timeouts} by timeout), "
          f"{len(survivors) - len(unexplained)} equivalent (explained), "
          f"{len(unexplained)} unexplained survivors, {skipped} not run (baseline failed); "
          f"{minutes:.1f} min, "
          f"{datetime.date.today()}, {platform.node()} ({os.cpu_count()} CPUs)")
    for m in unexplained:
        print(f"SURVIVED {m.path}:{m.line}  {m.mutation}")
    if unexplained:
        print("Each survivor is a change no test noticed: add a test that fails on it, or, when "
              "the change cannot alter behaviour, give the reason in scripts/mutants_allowed.toml.")
    return 1 if unexplained or broken else 0


if __name__ == "__main__":
    sys.exit(main())
