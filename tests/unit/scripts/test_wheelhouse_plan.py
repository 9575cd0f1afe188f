"""scripts/wheelhouse.py's plan on a small synthetic pip report, without the network: what
finetune reaches only through torch stays the node's, what it needs elsewhere is brought,
extras and markers decide edges, and a node's own packages stay out where their versions are in
bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import wheelhouse

LINUX_312 = wheelhouse.target_environments("3.12", ["manylinux_2_28_x86_64"])


def _item(name: str, version: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def _report(transformers: str = "4.57.0", hub_bound: str = "<1.0,>=0.34") -> list[dict]:
    """finetune -> torch, transformers, datasets (-> fsspec[http]), tensorboard for its extra;
    torch -> sympy, jinja2, triton, nvidia, setuptools and the shared filelock/fsspec."""
    return [
        _item("finetune", "0.1.0", "torch<=2.14.1,>=2.4", "transformers<6,>=4.56",
              "datasets>=3.0", 'tensorboard>=2.14; extra == "tensorboard"'),
        _item("torch", "2.13.0", "filelock", "typing-extensions>=4.10", "sympy>=1.13.3",
              "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5",
              'setuptools; python_version >= "3.12"',
              'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux"',
              'triton==3.5.0; platform_system == "Linux"'),
        _item("sympy", "1.14.0", "mpmath<1.4,>=1.1.0"),
        _item("mpmath", "1.3.0", 'pytest>=4.6; extra == "develop"'),
        _item("networkx", "3.6.1"),
        _item("Jinja2", "3.1.6", "MarkupSafe>=2.0"),
        _item("MarkupSafe", "3.0.4"),
        _item("setuptools", "80.0.0"),
        _item("nvidia-cublas-cu12", "12.8.4.1"),
        _item("triton", "3.5.0"),
        _item("transformers", transformers, "filelock", f"huggingface-hub{hub_bound}",
              'accelerate>=0.26.0; extra == "torch"', 'torch>=2.2; extra == "torch"',
              'tomli; python_version < "3.11"'),
        _item("huggingface_hub", "0.36.0" if hub_bound.startswith("<") else "1.2.0",
              "filelock", "fsspec>=2023.5.0", "typing-extensions>=3.7.4.3",
              'colorama; platform_system == "Windows"'),
        _item("datasets", "4.1.0", "filelock", "fsspec[http]<=2025.9.0,>=2023.1.0",
              "huggingface-hub>=0.24"),
        _item("fsspec", "2025.9.0", 'aiohttp!=4.0.0a0; extra == "http"',
              'gcsfs; extra == "gcs"'),
        _item("aiohttp", "3.13.0"),
        _item("gcsfs", "2025.9.0"),
        _item("tomli", "2.3.0"),
        _item("colorama", "0.4.6"),
        _item("accelerate", "1.10.0", "torch>=2.0.0", "huggingface-hub>=0.21.0"),
        _item("filelock", "3.20.0"),
        _item("typing_extensions", "4.15.0"),
        _item("tensorboard", "2.20.0"),
    ]


def _brought(result: wheelhouse.Plan) -> set[str]:
    return {name for name, _ in result.bring}


def test_what_only_torch_needs_stays_the_nodes_and_shared_packages_are_brought() -> None:
    result = wheelhouse.plan(_report(), LINUX_312)
    brought = _brought(result)
    assert brought == {"transformers", "huggingface-hub", "datasets", "fsspec", "aiohttp",
                       "filelock", "typing-extensions"}
    left = {name for name, _ in result.torch_only}
    assert {"torch", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools",
            "triton", "nvidia-cublas-cu12"} <= left
    assert not brought & left


def test_an_edge_holds_only_for_an_extra_asked_of_its_package_and_a_true_marker() -> None:
    result = wheelhouse.plan(_report(), LINUX_312)
    # fsspec[http] is asked by datasets: aiohttp comes, gcsfs (extra "gcs") does not;
    # transformers' accelerate edge needs transformers[torch], which nobody asks here.
    assert "aiohttp" in _brought(result)
    assert not {"gcsfs", "accelerate", "tensorboard"} & _brought(result)
    # A marker false on the target drops the edge: colorama is Windows-only, tomli < 3.11.
    assert not {"colorama", "tomli"} & _brought(result)
    older = wheelhouse.plan(_report(), wheelhouse.target_environments("3.10",
                                                                    ["manylinux_2_28_x86_64"]))
    assert "tomli" in _brought(older)
    windows = wheelhouse.plan(_report(), wheelhouse.target_environments("3.12", ["win_amd64"]))
    assert "colorama" in _brought(windows)
    # finetune's own extra, asked on the command line, brings its package.
    assert "tensorboard" in _brought(wheelhouse.plan(_report(), LINUX_312, ["tensorboard"]))


def test_an_unreadable_marker_keeps_the_edge() -> None:
    items = [_item("finetune", "0.1.0", 'odd; platform_machine == "x86_64"'), _item("odd", "1")]
    # A platform tag this script does not know leaves the machine unknown: keep, never drop.
    unknown = wheelhouse.target_environments("3.12", ["some_future_tag"])
    assert "odd" in _brought(wheelhouse.plan(items, unknown))
    assert "odd" not in _brought(wheelhouse.plan(
        items, wheelhouse.target_environments("3.12", ["manylinux_2_28_aarch64"])))


def test_the_nodes_packages_in_bounds_stay_out_and_out_of_bounds_ones_are_brought() -> None:
    node = {"transformers": "4.57.1", "fsspec": "2026.1.0", "filelock": "3.20.0",
            "sympy": "1.14.0", "torch": "2.13.0+cpu", "huggingface-hub": "0.36.0"}
    result = wheelhouse.plan(_report(), LINUX_312, node=node)
    assert dict(result.node_keeps) == {"transformers": "4.57.1", "filelock": "3.20.0",
                                       "huggingface-hub": "0.36.0"}
    assert "fsspec" in _brought(result) and "transformers" not in _brought(result)
    # The reason names the bound and who sets it.
    assert result.replaced == {
        "fsspec": "the node has 2026.1.0; datasets 4.1.0 requires fsspec<=2025.9.0,>=2023.1.0"}
    assert not result.gpu_out_of_bounds  # 2.13.0+cpu is within torch<=2.14.1,>=2.4
    # finetune's own bound counts: a transformers below 4.56 is replaced.
    old = wheelhouse.plan(_report(), LINUX_312, node={"transformers": "4.40.0"})
    assert "transformers" in _brought(old)
    assert "finetune 0.1.0 requires transformers<6,>=4.56" in old.replaced["transformers"]
    # torch is never brought; a torch out of range is reported.
    older = wheelhouse.plan(_report(), LINUX_312, node={"torch": "2.3.1"})
    assert "torch" not in _brought(older) and "torch<=2.14.1,>=2.4" in \
        older.gpu_out_of_bounds["torch"]


def test_pins_are_resolved_again_until_they_settle(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """Unpinned, pip picks transformers 5 (which needs huggingface-hub>=1), so the node's hub
    0.36 looks out of bounds; pinned to the node's transformers 4.57, it is in bounds."""
    asked = _fake_index(monkeypatch)
    node = {"transformers": "4.57.1", "huggingface-hub": "0.36.0"}
    result = wheelhouse.resolve_plan(tmp_path / "finetune.whl", [], LINUX_312, node=node)
    assert asked == [{}, {"transformers": "4.57.1"},
                     {"transformers": "4.57.1", "huggingface-hub": "0.36.0"}]
    assert dict(result.node_keeps) == node
    assert not {"transformers", "huggingface-hub"} & _brought(result)


def _fake_index(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """pip's resolutions as the index would give them: unpinned, transformers 5 (which needs
    huggingface-hub>=1); with transformers pinned, 4.57.1. Returns the pins each call was given."""
    asked: list[dict] = []

    def fake_report(wheel, options, extras=(), constraints=None):
        asked.append(dict(constraints or {}))
        if "transformers" in (constraints or {}):
            return _report("4.57.1")
        return _report("5.0.0", hub_bound=">=1.0")

    monkeypatch.setattr(wheelhouse, "resolve_report", fake_report)
    monkeypatch.setattr(wheelhouse, "pinned_report", _fake_pinned_report)
    return asked


def _fake_pinned_report(pins: dict[str, str], options) -> list[dict]:
    """The pinned versions' metadata as the index has it: transformers 4.x wants a hub < 1."""
    hub = "<1.0,>=0.34" if pins.get("transformers", "5").startswith("4.") else ">=1.0"
    requires = {"transformers": [f"huggingface-hub{hub}", "filelock"],
                "huggingface-hub": ["filelock"]}
    return [_item(name, version, *requires.get(name, [])) for name, version in pins.items()]


def test_a_node_package_another_node_package_rules_out_is_brought_not_pinned(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The node's transformers 4.57 wants huggingface-hub<1.0 and the node has 2.4: pinning
    both would leave pip backtracking for hours; hub is brought instead, with the reason."""
    asked = _fake_index(monkeypatch)
    node = {"transformers": "4.57.1", "huggingface-hub": "2.4.0"}
    result = wheelhouse.resolve_plan(tmp_path / "finetune.whl", [], LINUX_312, node=node)
    assert all("huggingface-hub" not in pins for pins in asked)
    assert dict(result.node_keeps) == {"transformers": "4.57.1"}
    assert ("huggingface-hub", "0.36.0") in result.bring
    assert result.replaced["huggingface-hub"] == (
        "the node has 2.4.0; the node's transformers 4.57.1 requires "
        "huggingface-hub<1.0,>=0.34")


def test_a_constrained_resolution_that_fails_names_the_nodes_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_report(wheel, options, extras=(), constraints=None):
        if constraints:
            raise wheelhouse.PipError("pip failed", (
                "ERROR: Cannot install finetune because these package versions have "
                "conflicting dependencies.\nThe conflict is caused by:\n    The user requested "
                "(constraint) transformers==4.57.1\n    peft 0.18 depends on transformers>=4.60"
                "\n    The user requested (constraint) huggingface_hub==0.36.0"
                "\nERROR: ResolutionImpossible"))
        return _report()

    monkeypatch.setattr(wheelhouse, "resolve_report", fake_report)
    monkeypatch.setattr(wheelhouse, "pinned_report", _fake_pinned_report)
    node = {"transformers": "4.57.1", "filelock": "3.20.0", "huggingface-hub": "0.36.0"}
    with pytest.raises(SystemExit) as caught:
        wheelhouse.resolve_plan(tmp_path / "finetune.whl", [], LINUX_312, node=node)
    message = str(caught.value)
    assert "the node's huggingface-hub==0.36.0, transformers==4.57.1 conflict" in message
    assert "filelock" not in message.split("pip says")[0]
    assert "ResolutionImpossible" in message


def test_a_node_freeze_is_read_by_canonical_name(tmp_path: Path) -> None:
    freeze = tmp_path / "node-freeze.txt"
    freeze.write_text("# pip list --format=freeze\nJinja2==3.1.6\ntorch==2.13.0+cpu\n"
                      "typing_extensions==4.16.0\n-e git+https://example.org/x#egg=x\n"
                      "local @ file:///tmp/local-1.0-py3-none-any.whl\n")
    assert wheelhouse.read_node_freeze(freeze) == {
        "jinja2": "3.1.6", "torch": "2.13.0+cpu", "typing-extensions": "4.16.0"}
    result = wheelhouse.plan(_report(), LINUX_312, node={"torch": "2.13.0+cpu",
                                                         "transformers": "4.57.1+local"})
    assert wheelhouse.node_pins(result) == {"transformers": "4.57.1"}
