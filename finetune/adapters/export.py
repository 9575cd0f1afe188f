"""What a run leaves behind as a plain Hugging Face model: write `final/` at the end of a run;
say what a RUN_OR_MODEL argument names (`describe_source`); load a run's adapter, or a
checkpoint's trainable weights, onto its base model; merge LoRA (and QLoRA) into the base
weights."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from finetune.checkpoint.files import (
    MANIFEST,
    new_temp_path,
    share_as_umask_allows,
    verify_manifest,
)
from finetune.config.schema import ModelConfig, PeftConfig
from finetune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def export_final(model, tokenizer, run_dir: Path, *, chat_template: str | None = None,
                 weights: dict | None = None) -> Path:
    """Write `run_dir/final` atomically: the adapter in peft format (or the full model), plus
    the tokenizer with `chat_template` (the template the run trained with, so that the result
    generates as it was trained, also when the tokenizer came without one). `weights`: the
    trained weights gathered from a sharded run's shards (the model's own otherwise). An
    existing final/ is replaced only once the new one is complete. Folder and files get the
    umask's permissions, as checkpoints do. Running out of space raises DiskFullError (exit
    code 1) with the temporary folder removed and checkpoints and any earlier final/ intact."""
    final = run_dir / "final"
    if chat_template is not None and tokenizer.chat_template != chat_template:
        if tokenizer.chat_template:
            logger.info("final/: saving the chat template used in training (data.chat_template) "
                        "instead of the tokenizer's own")
        tokenizer.chat_template = chat_template
    tmp = new_temp_path(run_dir, ".final-", folder=True)
    try:
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        share_as_umask_allows(tmp)
    except Exception as exc:
        from finetune.checkpoint.store import disk_full, is_disk_full

        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(run_dir, _weight_bytes(model, weights), "final/",
                            keeps="The checkpoints (and any earlier final/) are intact.",
                            fix="Free some space, then run the same command with resume=auto: "
                                "it continues from the newest checkpoint and writes final/.") \
                from None
        raise
    if final.exists():
        old = run_dir / ".final-old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def _weight_bytes(model, weights: dict | None = None) -> int:
    """About how many bytes saving `model` writes: its trainable weights when it is an adapter
    (or `weights`), all its weights otherwise, plus a margin for the tokenizer and configs."""
    import torch

    from finetune.checkpoint.trainable import trainable_state

    if weights is None:
        adapter = hasattr(model, "peft_config")
        weights = trainable_state(model) if adapter else model.state_dict()
    return sum(t.numel() * t.element_size() for t in weights.values()
               if isinstance(t, torch.Tensor)) + 2**20


def _read_run_config(path: Path) -> dict:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.yaml, so its base model is unknown. Pass "
                              "a run directory, a checkpoint directory, or an adapter folder.")
    try:
        return OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # changed after the save, most likely
        problem = verify_manifest(path) if (path / MANIFEST).is_file() else None
        raise CheckpointError(
            f"checkpoint {path} is not usable: {problem or f'config.yaml cannot be read ({exc})'}"
            ". Use another checkpoint of the run, or its final/.") from None


@dataclass(frozen=True)
class TrainedSource:
    """What a RUN_OR_MODEL argument names.

    `kind`: run (its final/), checkpoint, adapter (a peft folder), model (a model folder, a
    hub id or `tiny`). `path`: the folder to load (a run's final/), or the name. `run_dir`: the
    folder holding the run's config.yaml and kernel_plan.json (a run, or a checkpoint; for an
    adapter folder its parent when that is the run), else None. `adapter`: what is loaded is
    an adapter on a base model (a LoRA run's final/, a checkpoint of one, an adapter folder).
    """

    kind: str
    path: Path | str
    run_dir: Path | None = None
    adapter: bool = False

    def run_config(self) -> dict | None:
        """The resolved config the run trained with (config.yaml), if this came from a run."""
        if self.run_dir is None:
            return None
        return OmegaConf.to_container(OmegaConf.load(self.run_dir / "config.yaml"), resolve=True)

    @property
    def peft_method(self) -> str | None:
        config = self.run_config()
        return str(config.get("peft", {}).get("method")) if config else None

    def precision(self) -> str | None:
        """The precision the run computed in (bf16 | fp16 | fp32), from its kernel_plan.json."""
        if self.run_dir is None or not (self.run_dir / "kernel_plan.json").is_file():
            return None
        plan = json.loads((self.run_dir / "kernel_plan.json").read_text(encoding="utf-8"))
        return plan.get("kernels", {}).get("precision", {}).get("choice")


def describe_source(source: Path | str) -> TrainedSource:
    """Say what `source` is (see TrainedSource). ConfigError (exit code 2) for a folder or path
    that holds no model; CheckpointError for a run directory that has no final/ yet."""
    from finetune.checkpoint.weights import holds_weights

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "final").is_dir():
            final = path / "final"
            return TrainedSource("run", final, path, (final / "adapter_config.json").is_file())
        if (path / "adapter_config.json").is_file():
            parent = path.parent if (path.parent / "config.yaml").is_file() else None
            return TrainedSource("adapter", path, parent, adapter=True)
        if holds_weights(path):  # a checkpoint of any strategy (single, ddp, fsdp2, deepspeed)
            method = str(_read_run_config(path).get("peft", {}).get("method"))
            return TrainedSource("checkpoint", path, path, adapter=method != "none")
        if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
            steps = sorted((path / "checkpoints").glob("step_*"))
            which = (f"one of its checkpoints, e.g. {steps[-1]}" if steps else
                     "one of its checkpoints/step_NNNNNNN directories (it has none yet)")
            raise CheckpointError(f"{path} looks like a run directory without final/ (the run "
                                  f"did not finish?). Pass {which}.")
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is not a model: it has no config.json (a model folder), "
                "adapter_config.json (an adapter), final/ (a run) or the weights of a "
                "checkpoint (trainable.safetensors, sharded/ or deepspeed/). Pass a run directory, one of its checkpoints/step_NNNNNNN, a "
                "merged or downloaded model folder, a hub id, or tiny.")
        return TrainedSource("model", path)
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")):
        raise ConfigError(f"{source} is not a folder: pass a run directory, a checkpoint, an "
                          "adapter or model folder, a hub id, or tiny.")
    return TrainedSource("model", text)


def load_trained_model(source: Path | str, *, dtype=None, attention: str = "sdpa"):
    """Return (model, tokenizer) for a run dir, a checkpoint dir, an adapter folder or a model,
    loaded with transformers' `attention` implementation.

    A run dir uses its `final/`; a checkpoint dir rebuilds the adapter and loads its trainable
    weights; a folder with adapter_config.json loads through peft (a QLoRA adapter onto the
    base in full precision); anything else is loaded as a plain causal LM (`tiny`, a model
    folder or a hub id). Errors as `describe_source`.
    """
    import torch
    from peft import PeftModel

    from finetune.adapters.lora import apply_adapter
    from finetune.checkpoint.trainable import load_trainable
    from finetune.checkpoint.weights import checkpoint_weights
    from finetune.models import load_model, load_tokenizer

    dtype = dtype or torch.float32
    found = describe_source(source)
    path = found.path
    if found.adapter and found.kind != "checkpoint":
        adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_cfg = ModelConfig(name_or_path=adapter_cfg["base_model_name_or_path"])
        base = load_model(base_cfg, attn_implementation=attention, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path))
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(str(path))  # saved beside the adapter
    if found.kind == "checkpoint":
        problem = verify_manifest(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
        run = _read_run_config(path)
        model_cfg = ModelConfig(**run["model"])
        model = apply_adapter(load_model(model_cfg, attn_implementation=attention, dtype=dtype),
                              PeftConfig(**run["peft"]))
        load_trainable(model, checkpoint_weights(path), path)
        return model, load_tokenizer(model_cfg)
    model_cfg = ModelConfig(name_or_path=str(path))  # a model, or a full fine-tune's final/
    return load_model(model_cfg, attn_implementation=attention, dtype=dtype), \
        load_tokenizer(model_cfg)


def _merge_dtype(found: TrainedSource):
    """The dtype a run's adapter is merged in: fp32, except for QLoRA runs (see merge_to_folder)."""
    import torch

    from finetune.adapters.qlora import QLORA

    if found.peft_method != QLORA:
        return torch.float32
    return torch.float16 if found.precision() == "fp16" else torch.bfloat16


def merge_to_folder(source: Path | str, out_dir: Path | str) -> Path:
    """Merge a LoRA run/checkpoint into its base and write a full HF model folder (safetensors).

    A QLoRA run trained against 4-bit base weights; its adapter is merged into the base loaded
    in the run's 16-bit compute dtype (bf16, or fp16 for an fp16 run), which is logged, since
    merging into the 4-bit weights would round the adapter's update away. ConfigError (exit
    code 2) when `source` has no adapter to merge (a full fine-tune's final/ is already a
    complete model), OUT_DIR is not empty or cannot be written; DiskFullError (exit code 1)
    when the disk fills. A failure leaves nothing behind: no OUT_DIR, no temporary folder, no
    parent folder it created. The folder and files get the umask's permissions.
    """
    import torch
    from peft import PeftModel

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT_DIR {out} is not an empty folder; not overwriting it. Choose a "
                          "new folder.")
    found = describe_source(source)
    if not found.adapter:
        raise ConfigError(f"{source} has no adapter to merge: it is a complete model already "
                          "(a full fine-tune's final/, a merged folder or a base model). Load it "
                          "directly with AutoModelForCausalLM.from_pretrained, or pass a LoRA "
                          "run, one of its checkpoints or an adapter folder.")
    # Before the model loads: a place that cannot be written fails at once, leaving nothing.
    made, tmp = _merge_folder(out)
    model = None
    try:
        dtype = _merge_dtype(found)
        if dtype != torch.float32:
            logger.warning("%s is a QLoRA run: its adapter is merged into the base loaded in %s "
                           "(not into the 4-bit NF4 weights it trained against); the merged "
                           "model is saved in %s", source, str(dtype).removeprefix("torch."),
                           str(dtype).removeprefix("torch."))
        model, tokenizer = load_trained_model(source, dtype=dtype)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        share_as_umask_allows(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):  # the parents this merge created, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        from finetune.checkpoint.store import disk_full, is_disk_full

        if isinstance(exc, Exception) and is_disk_full(exc):
            needed = _weight_bytes(model, model.state_dict()) if model is not None else None
            raise disk_full(out.parent, needed, f"the merged model {out.name}",
                            keeps="Nothing was written there.",
                            fix="Free some space (or choose another disk for OUT_DIR), then "
                                "merge again.") from None
        raise
    return out


def _merge_folder(out: Path, what: str = "the merged model") -> tuple[list[Path], Path]:
    """Create OUT_DIR's missing parents and a temporary folder beside OUT_DIR: (the parents
    created, the temporary folder). ConfigError (exit code 2), with nothing left behind, when
    that place cannot be written (read-only, no permission, not a folder); it names `what`."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()][::-1]
    try:
        for folder in made:
            folder.mkdir()
        return made, new_temp_path(out.parent, f".{out.name}-", folder=True)
    except OSError as exc:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(f"cannot write {what} to {out}: {exc.strerror or exc} "
                          f"({out.parent}). Choose an OUT_DIR in a folder you can write.") \
            from None
