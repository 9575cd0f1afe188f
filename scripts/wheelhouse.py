"""Build a wheelhouse for an offline node that already has torch: finetune's wheel and the
dependencies it needs that the node lacks, for a target Python and platform. torch, CUDA, ROCm
and Triton stay out, and so does every package only torch needs (sympy, networkx, jinja2, ...):
the node's torch brought them.

    python scripts/wheelhouse.py [--out wheelhouse] [--python-version 3.12]
                                 [--platform manylinux_2_28_x86_64 ...] [--extra tensorboard ...]
                                 [--node-has node-freeze.txt]
    make wheelhouse PY=3.12 PLATFORM=manylinux_2_28_x86_64 EXTRAS="tensorboard gguf" \
        NODE_FREEZE=node-freeze.txt

`--node-has` takes the node's `python -m pip list --format=freeze`. A package the node has at a
version within every bound the resolved set puts on it (finetune's own included) is pinned to
the node's version for the resolution and left out of the wheelhouse: pip on the node keeps it.
One out of bounds is brought, and the build says which bound it breaks. Run it where the package
index is reachable, copy the folder to the node, and install there:

    pip install --no-index --find-links wheelhouse finetune

Steps: build finetune's wheel; resolve the whole dependency set for the target with
`pip install --dry-run --report` (metadata only), pinned to the node's in-bound versions, until
no pin changes; from the report's `requires_dist`, keep what finetune (with its extras) reaches
without passing through torch; `pip download --no-deps --only-binary=:all:` that, less what the
node keeps.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # an interpreter without packaging: pip's own copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import (  # type: ignore[no-redef]
        InvalidRequirement,
        Requirement,
    )
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
# The node's torch brings these; a wheelhouse with them would weigh gigabytes.
GPU_STACK = re.compile(r"^(torch|triton|pytorch-triton(-.+)?|nvidia-.+|cuda-.+|rocm-.+)$")
# The package whose own dependencies are the node's: what only it needs is not brought.
NODE_ROOT = "torch"
# Pure-Python dependencies published as source only (hydra-core pins antlr4 4.9.*, which has no
# wheel on PyPI): built into wheels here, so the node needs no build tools.
SOURCE_ONLY = ("antlr4-python3-runtime==4.9.3",)
# Rounds of "resolve, pin what the node has in bounds, resolve again" before giving up on more.
MAX_ROUNDS = 4
# How long a resolution pinned to the node's versions may take: where the pins fit no release of
# the other packages, pip backtracks through their older releases, which can take hours.
PINNED_RESOLVE_TIMEOUT_S = 300


def canonical(name: str) -> str:
    """A distribution name as the index spells it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def default_platform() -> str:
    """manylinux_2_28 of this machine's architecture: glibc 2.28 or newer, most clusters today."""
    return f"manylinux_2_28_{platform.machine()}"


class PipError(SystemExit):
    """pip failed; `output` keeps everything it printed."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def pip_tail(output: str, lines: int = 15) -> str:
    """pip's last lines, without its warnings (a configured index folder that is missing...)."""
    kept = [line for line in output.strip().splitlines() if not line.startswith("WARNING:")]
    return "\n".join(kept[-lines:])


def pip(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run this interpreter's pip; raise PipError (a SystemExit) with pip's own last lines on
    failure or after `timeout` seconds."""
    command = [sys.executable, "-m", "pip", *args]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                         for part in (exc.stdout or "", exc.stderr or ""))
        raise PipError(f"wheelhouse: `pip {args[0]}` did not finish within {timeout:.0f} s:\n"
                       f"{pip_tail(output)}", output) from None
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        raise PipError(f"wheelhouse: `pip {args[0]}` failed (exit {proc.returncode}):\n"
                       f"{pip_tail(output)}", output)
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


def requirement(wheel: Path, extras: Iterable[str]) -> str:
    """What pip resolves and the node installs: finetune's wheel, with its extras if asked."""
    extras = list(extras)
    return f"{wheel}[{','.join(extras)}]" if extras else str(wheel)


def install_command(out: Path, extras: list[str]) -> str:
    """The node's install command for a wheelhouse built with `extras`."""
    name = f"'finetune[{','.join(extras)}]'" if extras else "finetune"
    return f"pip install --no-index --find-links {out.name} {name}"


def resolve_report(wheel: Path, options: list[str], extras: Iterable[str] = (),
                   constraints: dict[str, str] | None = None) -> list[dict]:
    """The `install` items of pip's resolution report for finetune (with `extras`) on the
    target, each package pinned to `constraints` (name -> version) where given (then within
    PINNED_RESOLVE_TIMEOUT_S)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pinned: list[str] = []
        if constraints:
            pins = Path(tmp) / "node-constraints.txt"
            pins.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
            pinned = ["-c", str(pins)]
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "--target", str(Path(tmp) / "target"), *options, *pinned,
            requirement(wheel, extras),
            **({"timeout": PINNED_RESOLVE_TIMEOUT_S} if pinned else {}))
        return json.loads(report.read_text())["install"]


def pinned_report(pins: dict[str, str], options: list[str]) -> list[dict]:
    """The `install` items (metadata) of exactly the node's pinned versions, their own
    dependencies not resolved: a quick look at what each requires of the others."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet", "--report",
            str(report), "--target", str(Path(tmp) / "target"), *options,
            *(f"{n}=={v}" for n, v in sorted(pins.items())))
        return json.loads(report.read_text())["install"]


def resolve(wheel: Path, options: list[str], extras: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(name, version) of every distribution finetune (with `extras`) needs on the target,
    itself excluded."""
    items = resolve_report(wheel, options, extras)
    found = [(canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in items]
    return sorted((n, v) for n, v in found if n != "finetune")


# ------------------------------------------------------------------ the dependency graph

def target_environments(python_version: str,
                        platforms: list[str]) -> list[dict[str, str | None]]:
    """Marker environments (PEP 508) of the target, one per platform tag; None where the tag
    does not tell (an edge whose marker asks it is kept)."""
    full = python_version if python_version.count(".") >= 2 else f"{python_version}.0"
    short = ".".join(full.split(".")[:2])
    environments = []
    for tag in platforms or [default_platform()]:
        if tag.startswith(("manylinux", "musllinux", "linux")):
            system, sys_platform, os_name = "Linux", "linux", "posix"
        elif tag.startswith("macosx"):
            system, sys_platform, os_name = "Darwin", "darwin", "posix"
        elif tag.startswith("win"):
            system, sys_platform, os_name = "Windows", "win32", "nt"
        else:
            system = sys_platform = os_name = None
        machine = {"win_amd64": "AMD64", "win32": "x86", "win_arm64": "ARM64"}.get(tag)
        arch = re.fullmatch(r"(?:manylinux_\d+_\d+|manylinux\d+|musllinux_\d+_\d+|linux"
                            r"|macosx_\d+_\d+)_(\w+)", tag)
        environments.append({
            "python_version": short, "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full,
            "platform_python_implementation": "CPython", "platform_system": system,
            "sys_platform": sys_platform, "os_name": os_name,
            "platform_machine": machine or (arch[1] if arch else None),
            "platform_release": None, "platform_version": None})
    return environments


@dataclass(frozen=True)
class Edge:
    """One requirement of a package on another, as `requires_dist` writes it."""

    name: str  # canonical
    extras: frozenset[str]
    requirement: Requirement | None  # None: a line packaging could not parse


def parse_edge(text: str) -> Edge:
    try:
        req = Requirement(text)
    except InvalidRequirement:  # unsure what it asks: the name alone, an edge always present
        return Edge(canonical(re.split(r"[\s<>=!~;\[(@]", text.strip(), maxsplit=1)[0]),
                    frozenset(), None)
    return Edge(canonical(req.name), frozenset(canonical(e) for e in req.extras), req)


def edge_present(edge: Edge, environments: list[dict[str, str]], extras: Iterable[str]) -> bool:
    """Whether `edge` holds on the target for a package asked with `extras`: its marker is true
    in some target environment with no extra or with one of `extras`. Unsure means yes."""
    if edge.requirement is None or edge.requirement.marker is None:
        return True
    marker: Marker = edge.requirement.marker
    for environment in environments:
        if any(value is None and key in str(marker) for key, value in environment.items()):
            return True  # it asks what the target's tag does not tell (a kernel release)
        for extra in ("", *extras):
            try:
                if marker.evaluate({**environment, "extra": extra}):
                    return True
            except Exception:  # a marker this environment cannot decide: keep the edge
                return True
    return False


@dataclass
class Graph:
    """The resolved set: each package's version and requirements, by canonical name."""

    versions: dict[str, str]
    edges: dict[str, list[Edge]]
    environments: list[dict[str, str]]

    @classmethod
    def from_report(cls, items: list[dict], environments: list[dict[str, str]]) -> Graph:
        versions, edges = {}, {}
        for item in items:
            meta = item["metadata"]
            name = canonical(meta["name"])
            versions[name] = meta["version"]
            edges[name] = [parse_edge(r) for r in meta.get("requires_dist") or []]
        return cls(versions, edges, environments)

    def reachable(self, root: str, extras: Iterable[str] = (),
                  stop: Iterable[str] = ()) -> dict[str, set[str]]:
        """Every package `root` (asked with `extras`) needs, itself included, with the extras
        asked of each; the walk enters no package of `stop` (they are not in the result)."""
        stop = {canonical(s) for s in stop}
        asked: dict[str, set[str]] = {canonical(root): {canonical(e) for e in extras}}
        todo = [canonical(root)]
        while todo:
            name = todo.pop()
            for edge in self.edges.get(name, []):
                if edge.name in stop or edge.name not in self.versions:
                    continue
                if not edge_present(edge, self.environments, asked[name]):
                    continue
                before = asked.get(edge.name)
                if before is None or not edge.extras <= before:
                    asked[edge.name] = (before or set()) | edge.extras
                    todo.append(edge.name)
        return asked

    def requirements_on(self, target: str, root: str = "finetune",
                        extras: Iterable[str] = ()) -> list[tuple[str, Requirement]]:
        """(package, requirement) of every requirement on `target` that holds in the set, with
        the extras each package is asked for on the way from `root` (asked with `extras`)."""
        asked = self.reachable(root, extras)
        found = []
        for name, edges in self.edges.items():
            for edge in edges:
                if (edge.name == canonical(target) and edge.requirement is not None
                        and edge_present(edge, self.environments, asked.get(name, ()))):
                    found.append((name, edge.requirement))
        return found


def read_node_freeze(path: Path) -> dict[str, str]:
    """name -> version from `pip list --format=freeze` (or `pip freeze`) output; lines without
    a version (`-e`, `name @ url`) and comments are skipped."""
    node = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*===?\s*(\S+)\s*", line)
        if match:
            node[canonical(match[1])] = match[2]
    return node


def out_of_bounds(graph: Graph, name: str, version: str, extras: Iterable[str],
                  root: str = "finetune") -> str | None:
    """Why the node's `name` at `version` cannot stay (the first bound it breaks), or None when
    every requirement on it in `graph` accepts it (prereleases and local versions allowed, as
    pip allows them for an installed package). finetune's own requirements count with
    `extras`."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return f"the node's version {version!r} is not a valid version"
    requirements = graph.requirements_on(name, root, extras)
    for owner, req in requirements:
        if req.specifier and not req.specifier.contains(parsed, prereleases=True):
            by = f"{owner} {graph.versions[owner]}" if owner in graph.versions else owner
            return f"the node has {version}; {by} requires {name}{req.specifier}"
    return None


# ------------------------------------------------------------------ the plan and the build

@dataclass
class Plan:
    """What a wheelhouse holds and what it leaves to the node."""

    graph: Graph
    bring: list[tuple[str, str]]  # (name, version) to download
    node_keeps: list[tuple[str, str]]  # (name, node version): in bounds, pinned, not brought
    torch_only: list[tuple[str, str]]  # needed only through torch (or the GPU stack): the node's
    replaced: dict[str, str] = field(default_factory=dict)  # node package brought -> why
    gpu_out_of_bounds: dict[str, str] = field(default_factory=dict)  # torch & co. out of range


def plan(items: list[dict], environments: list[dict[str, str]], extras: Iterable[str] = (),
         node: dict[str, str] | None = None, refused: dict[str, str] | None = None) -> Plan:
    """Split a resolution report: what finetune (with `extras`) reaches without passing through
    torch is brought, except the GPU stack and what the node has in bounds; the rest is the
    node's. `refused`: node packages brought anyway, with the reason (`pin_conflicts`)."""
    extras = [canonical(e) for e in extras]
    graph = Graph.from_report(items, environments)
    needed = graph.reachable("finetune", extras, stop=[NODE_ROOT])
    node = node or {}
    result = Plan(graph, [], [], [])
    for name, version in sorted(graph.versions.items()):
        if name == "finetune":
            continue
        if name not in needed or GPU_STACK.match(name):
            result.torch_only.append((name, version))
            if name in node and GPU_STACK.match(name):
                why = out_of_bounds(graph, name, node[name], extras)
                if why:
                    result.gpu_out_of_bounds[name] = why
            continue
        if name in node:
            why = (refused or {}).get(name) or out_of_bounds(graph, name, node[name], extras)
            if why is None:
                result.node_keeps.append((name, node[name]))
                continue
            result.replaced[name] = why
        result.bring.append((name, version))
    return result


def node_pins(result: Plan) -> dict[str, str]:
    """The public versions (local labels dropped: `==2.5.1` matches `2.5.1+cu124`) that the
    node keeps, for the next resolution's constraints."""
    pins = {}
    for name, version in result.node_keeps:
        try:
            pins[name] = Version(version).public
        except InvalidVersion:
            pins[name] = version
    return pins


def pin_conflicts(items: list[dict], pins: dict[str, str],
                  environments: list[dict[str, str]]) -> dict[str, str]:
    """Pins another pinned package's own requirement breaks (a node whose transformers wants
    huggingface-hub<1.0 beside a huggingface-hub 2.4), each with the reason: `items` are the
    pinned versions' metadata (`pinned_report`). Left pinned, they would make pip backtrack
    for hours and fail; unpinned, the wheelhouse brings a version that fits."""
    graph = Graph.from_report(items, environments)
    broken: dict[str, str] = {}
    for owner, edges in sorted(graph.edges.items()):
        for edge in edges:
            if (edge.name == owner or edge.name not in pins or edge.requirement is None
                    or not edge_present(edge, environments, ())):
                continue
            spec = edge.requirement.specifier
            try:
                fits = spec.contains(Version(pins[edge.name]), prereleases=True)
            except InvalidVersion:
                fits = True
            if not fits:
                broken.setdefault(edge.name, f"the node has {pins[edge.name]}; the node's "
                                             f"{owner} {graph.versions[owner]} requires "
                                             f"{edge.name}{spec}")
    return broken


def _spelled(name: str) -> str:
    """A pattern for `name` however pip prints it (huggingface_hub, huggingface-hub)."""
    return "[-_.]".join(re.escape(part) for part in name.split("-"))


def conflict_message(error: PipError, pins: dict[str, str]) -> str:
    """A failed constrained resolution, with the node's packages pip named in its conflict."""
    text = error.output
    named = [f"{n}=={v}" for n, v in sorted(pins.items())
             if re.search(rf"(?i)(^|[^\w.-]){_spelled(n)}([^\w.-]|$)", text)]
    which = (f"the node's {', '.join(named)} conflict" if named else
             "the node's packages (pinned to their versions) conflict")
    return (f"wheelhouse: {which} with what finetune needs; no wheelhouse built, as it could not "
            f"install there. Upgrade or remove them on the node, or leave them out of "
            f"--node-has to bring pip's choice instead. pip says ({error}):\n"
            f"{pip_tail(text)}")


def resolve_plan(wheel: Path, options: list[str], environments: list[dict[str, str]],
                 extras: Iterable[str] = (), node: dict[str, str] | None = None) -> Plan:
    """Resolve, pin what the node has in bounds, and resolve again until the pins stop
    changing (a pin can bring another node package into bounds)."""
    extras = list(extras)
    pins: dict[str, str] = {}
    refused: dict[str, str] = {}
    result = plan(resolve_report(wheel, options, extras), environments, extras, node)
    for _ in range(MAX_ROUNDS):
        wanted = node_pins(result)
        if not node or wanted == pins:
            break
        try:
            clash = pin_conflicts(pinned_report(wanted, options), wanted, environments)
            refused.update(clash)
            pins = {n: v for n, v in wanted.items() if n not in clash}
            items = resolve_report(wheel, options, extras, pins)
        except PipError as exc:
            raise SystemExit(conflict_message(exc, wanted)) from None
        result = plan(items, environments, extras, node, refused)
    return result


def wheel_key(path: Path) -> tuple[str, str]:
    """(canonical name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def build(out: Path, python_version: str, platforms: list[str], extras: list[str] = (),
          node: dict[str, str] | None = None) -> dict[str, object]:
    """Fill `out`; returns what it holds and what was left to the node."""
    out.mkdir(parents=True, exist_ok=True)
    wheel = build_finetune_wheel(out)
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp)
        pip("wheel", "--no-deps", "--quiet", "-w", str(built), *SOURCE_ONLY)
        options = [*target_options(python_version, platforms), "--find-links", str(built)]
        result = resolve_plan(wheel, options, target_environments(python_version, platforms),
                              extras, node)
        bring = {name: version for name, version in result.bring}
        for path in built.glob("*.whl"):  # a source-only package the node lacks
            name, version = wheel_key(path)
            if bring.get(name) == version:
                shutil.copy2(path, out / path.name)
                del bring[name]
        if bring:
            pip("download", "--no-deps", "--quiet", "-d", str(out), *options,
                *(f"{n}=={v}" for n, v in sorted(bring.items())))
    wanted = {("finetune", wheel_key(wheel)[1]), *((n, v) for n, v in result.bring)}
    wheels = [p for p in out.glob("*.whl") if wheel_key(p) in wanted]
    return {"finetune": wheel.name, "wheels": len(wheels),
            "bytes": sum(p.stat().st_size for p in wheels),
            "largest": sorted(((p.stat().st_size, p.name) for p in wheels), reverse=True)[:5],
            "others": sorted(p.name for p in out.glob("*.whl") if p not in wheels),
            "plan": result}


def _names(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{n}=={v}" for n, v in pairs) or "none"


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
                             "plot, qlora (repeatable; the GPU stack in it stays out)")
    parser.add_argument("--node-has", type=Path, metavar="FILE",
                        help="the node's `python -m pip list --format=freeze`: what it has in "
                             "finetune's bounds stays out of the wheelhouse")
    args = parser.parse_args(argv)
    platforms = args.platforms or [default_platform()]
    node = None
    if args.node_has is not None:
        if not args.node_has.is_file():
            parser.error(f"--node-has {args.node_has}: no such file; write it on the node with "
                         "`python -m pip list --format=freeze > node-freeze.txt`")
        node = read_node_freeze(args.node_has)
        if not node:
            parser.error(f"--node-has {args.node_has}: no `name==version` line in it; write it "
                         "on the node with `python -m pip list --format=freeze`")
    result = build(args.out, args.python_version, platforms, args.extras, node)
    chosen: Plan = result["plan"]  # type: ignore[assignment]
    for name, why in sorted(chosen.replaced.items()):
        print(f"wheelhouse: bringing {name}=={dict(chosen.bring)[name]}: {why}")
    for name, why in sorted(chosen.gpu_out_of_bounds.items()):
        print(f"wheelhouse: warning: {name}: {why}; install a {name} in range on the node (the "
              "wheelhouse never holds the GPU stack)")
    print(f"wheelhouse: left to the node (torch and what only torch needs): "
          f"{_names(chosen.torch_only)}")
    if node is not None:
        print(f"wheelhouse: left to the node (it has them in bounds): "
              f"{_names(chosen.node_keeps)}")
    print(f"wheelhouse: {args.out} holds {result['wheels']} wheels, "
          f"{result['bytes'] / 2**20:.1f} MiB, for Python {args.python_version} on "
          f"{', '.join(platforms)}")
    print("wheelhouse: largest: " + ", ".join(
        f"{name} ({size / 2**20:.1f} MiB)" for size, name in result["largest"]))
    if result["others"]:
        print(f"wheelhouse: the folder also holds {len(result['others'])} wheels of an earlier "
              f"build, which pip on the node may pick: {', '.join(result['others'][:5])}...")
    print(f"wheelhouse: on the node: {install_command(args.out, args.extras)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
