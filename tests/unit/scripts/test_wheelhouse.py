"""scripts/wheelhouse.py's choices, without the network: which wheels a target accepts and which
packages stay the node's own."""

from __future__ import annotations

from scripts import wheelhouse


def test_a_manylinux_tag_admits_the_older_ones() -> None:
    tags = wheelhouse.compatible_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert wheelhouse.compatible_platforms("macosx_14_0_arm64") == ["macosx_14_0_arm64"]


def test_the_gpu_stack_stays_the_nodes() -> None:
    for name in ("torch", "triton", "pytorch-triton-rocm", "nvidia-cudnn-cu13", "cuda-bindings",
                 "nvidia-nccl-cu12"):
        assert wheelhouse.GPU_STACK.match(name), name
    for name in ("transformers", "peft", "accelerate", "hydra-core", "tritonclient", "torchao"):
        assert not wheelhouse.GPU_STACK.match(name), name


def test_target_options_name_every_platform_once() -> None:
    options = wheelhouse.target_options("3.12", ["manylinux_2_28_x86_64", "manylinux2014_x86_64"])
    assert options[:5] == ["--only-binary=:all:", "--python-version", "3.12", "--implementation",
                           "cp"]
    platforms = [options[i + 1] for i, o in enumerate(options) if o == "--platform"]
    assert len(platforms) == len(set(platforms)) and "manylinux2014_x86_64" in platforms


def test_an_extra_is_resolved_and_named_in_the_install_command(tmp_path, monkeypatch) -> None:
    import json
    from pathlib import Path

    asked = []

    def fake_pip(*args: str):
        asked.append(args)
        report = Path(args[args.index("--report") + 1])
        report.write_text(json.dumps({"install": [
            {"metadata": {"name": "finetune", "version": "0.1"}},
            {"metadata": {"name": "Tensorboard", "version": "2.20.0"}}]}))

    monkeypatch.setattr(wheelhouse, "pip", fake_pip)
    wheel = tmp_path / "finetune-0.1-py3-none-any.whl"
    assert wheelhouse.resolve(wheel, [], ["tensorboard", "gguf"]) == [("tensorboard", "2.20.0")]
    assert asked[0][-1] == f"{wheel}[tensorboard,gguf]"
    assert wheelhouse.resolve(wheel, []) and asked[1][-1] == str(wheel)
    assert wheelhouse.install_command(tmp_path / "wh", ["tensorboard"]) == (
        "pip install --no-index --find-links wh 'finetune[tensorboard]'")
    assert wheelhouse.install_command(tmp_path / "wh", []) == (
        "pip install --no-index --find-links wh finetune")
