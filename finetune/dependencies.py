"""finetune's declared dependencies that this environment lacks, named for the user.

An offline node (a Python with torch, nothing else) that got finetune without its wheelhouse
fails on its first `import omegaconf`; the command line turns that into one message naming every
missing package and the install command (docs/distributed.md, "Offline cluster").
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata

INSTALL_HINT = ("install them with finetune: `pip install finetune` where the package index is "
                "reachable; on an offline node, build a wheelhouse where it is (`make wheelhouse "
                "PY=3.X`), copy it over and run `pip install --no-index --find-links wheelhouse "
                "finetune` (docs/distributed.md, \"Offline cluster\")")

# Import names that differ from their distribution's name.
DISTRIBUTION_OF_MODULE = {"hydra": "hydra-core", "yaml": "pyyaml", "PIL": "pillow"}


# finetune's extras that add an output or a command, not a different computation: (extra, the
# module it brings, what needs it). `finetune env` lists them.
OPTIONAL_EXTRAS = (
    ("plot", "matplotlib", "report.png at the end of a run, finetune report --plot"),
    ("tensorboard", "tensorboard", "logger=tensorboard"),
    ("mlflow", "mlflow", "logger=mlflow"),
    ("gguf", "gguf", "finetune export --format gguf"),
    ("qlora", "bitsandbytes", "peft=qlora"),
)


def optional_extra_lines() -> list[str]:
    """`finetune env`'s lines on the optional extras: installed or not, and what needs each."""
    lines = ["optional extras (pip install 'finetune[NAME]'):"]
    for extra, module, purpose in OPTIONAL_EXTRAS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        lines.append(f"  {extra:<12} {'installed' if found else 'not installed':<14} {purpose}")
    return lines


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def declared_dependencies() -> list[str]:
    """Distribution names finetune requires (extras left out); empty when finetune's own
    metadata is not installed (a bare checkout on sys.path)."""
    try:
        requirements = metadata.requires("finetune") or []
    except metadata.PackageNotFoundError:
        return []
    return [_requirement_name(r) for r in requirements if "extra ==" not in r.replace('"', "")]


def missing_dependencies(names: list[str] | None = None) -> list[str]:
    """The distributions of `names` (default: finetune's own) that are not installed."""
    missing = []
    for name in declared_dependencies() if names is None else names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def missing_dependency_message(exc: ModuleNotFoundError,
                               names: list[str] | None = None) -> str | None:
    """One paragraph for an import that failed because finetune's dependencies are missing, or
    None when `exc` is about something else (a bug keeps its traceback)."""
    module = (exc.name or "").partition(".")[0]
    missing = missing_dependencies(names)
    wanted = _canonical(DISTRIBUTION_OF_MODULE.get(module, module))
    if not module or wanted not in {_canonical(name) for name in missing}:
        return None
    return (f"the Python package '{module}' is not installed, and this command needs it. "
            f"finetune's dependencies missing here: {', '.join(missing)}; {INSTALL_HINT}.")
