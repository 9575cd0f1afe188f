"""What a run leaves behind as a plain Hugging Face model: write `final/` at the end of a run;
load a run's adapter, or a checkpoint's trainable weights, onto its base model; merge LoRA into
the base weights."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from finetune.config.schema import ModelConfig, PeftConfig
from finetune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def export_final(model, tokenizer, run_dir: Path, *, chat_template: str | None = None) -> Path:
    """Write `run_dir/final` atomically: the adapter in peft format (or the full model), plus
    the tokenizer with `chat_template` (the template the run trained with, so that the result
    generates as it was trained, also when the tokenizer came without one). An existing
    final/ is replaced only once the new one is complete."""
    final = run_dir / "final"
    if chat_template is not None and tokenizer.chat_template != chat_template:
        if tokenizer.chat_template:
            logger.info("final/: saving the chat template used in training (data.chat_template) "
                        "instead of the tokenizer's own")
        tokenizer.chat_template = chat_template
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        old = run_dir / ".final-old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def _read_run_config(path: Path) -> dict:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.yaml, so its base model is unknown. Pass "
                              "a run directory, a checkpoint directory, or an adapter folder.")
    return OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)


def load_trained_model(source: Path | str, *, dtype=None):
    """Return (model, tokenizer) for a run dir, a checkpoint dir, an adapter folder or a model.

    A run dir uses its `final/`; a checkpoint dir rebuilds the adapter and loads its trainable
    weights; a folder with adapter_config.json loads through peft; anything else is loaded as a
    plain causal LM (`tiny`, a model folder or a hub id).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune.adapters.lora import apply_adapter
    from finetune.checkpoint.files import verify_manifest
    from finetune.checkpoint.trainable import load_trainable
    from finetune.models import load_model, load_tokenizer

    dtype = dtype or torch.float32
    path = Path(source)
    if path.is_dir() and (path / "final").is_dir():
        path = path / "final"
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base_cfg = ModelConfig(name_or_path=adapter_cfg["base_model_name_or_path"])
        base = load_model(base_cfg, attn_implementation="sdpa", dtype=dtype)
        model = PeftModel.from_pretrained(base, str(path))
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(str(path))  # saved beside the adapter
    if path.is_dir() and (path / "trainable.safetensors").is_file():
        problem = verify_manifest(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
        run = _read_run_config(path)
        model_cfg = ModelConfig(**run["model"])
        model = apply_adapter(load_model(model_cfg, attn_implementation="sdpa", dtype=dtype),
                              PeftConfig(**run["peft"]))
        load_trainable(model, load_file(str(path / "trainable.safetensors")), path)
        return model, load_tokenizer(model_cfg)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} looks like a run directory without final/ (the run did not "
                              "finish?). Pass one of its checkpoints/step_NNNNNNN directories.")
    model_cfg = ModelConfig(name_or_path=str(source))
    return load_model(model_cfg, attn_implementation="sdpa", dtype=dtype), \
        load_tokenizer(model_cfg)


def merge_to_folder(source: Path | str, out_dir: Path | str) -> Path:
    """Merge a LoRA run/checkpoint into its base and write a full HF model folder (safetensors)."""
    from peft import PeftModel

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"OUT_DIR {out} is not empty; not overwriting it. Choose a new folder.")
    model, tokenizer = load_trained_model(source)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
