"""Export a run or a model for local inference: `export_gguf` writes OUT/<name>.gguf and an
Ollama Modelfile, verified by a round trip through transformers' GGUF loader."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from finetune.errors import ConfigError, FinetuneError


class ExportVerificationError(FinetuneError):
    """The exported file does not reproduce the model (exit code 1); nothing was kept."""

    exit_code = 1


def _load_merged(source: Path | str):
    """(model, tokenizer, chat template) for a run, checkpoint, adapter or model folder; a LoRA
    merged into its base as `finetune merge` does (QLoRA into the base in the run's 16-bit
    dtype). The template is the one the run trained with: final/'s tokenizer keeps it; for a
    checkpoint it is resolved from the run's data.chat_template as training did."""
    from peft import PeftModel

    from finetune.adapters.export import _merge_dtype, describe_source, load_trained_model
    from finetune.data.template import resolve_template

    found = describe_source(source)
    model, tokenizer = load_trained_model(source, dtype=_merge_dtype(found))
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.eval()
    template = tokenizer.chat_template or None
    if found.kind == "checkpoint":
        setting = (found.run_config() or {}).get("data", {}).get("chat_template")
        template, _ = resolve_template(tokenizer, setting)
        tokenizer.chat_template = template
    return model, tokenizer, template


def export_gguf(source: Path | str, out_dir: Path | str, *, quant: str = "f16",
                verify: bool = True):
    """Write OUT_DIR/<OUT_DIR's name>.gguf and OUT_DIR/Modelfile from `source` (a run
    directory, a checkpoint, an adapter or a model folder); return (gguf path, RoundTrip or
    None when `verify` is False).

    The files are written in a temporary folder beside OUT_DIR and renamed into place only once
    the round trip passed: a failed check raises ExportVerificationError (exit code 1), a full
    disk DiskFullError (exit code 1), bad input ConfigError (exit code 2), and each leaves no
    OUT_DIR, no temporary folder and no parent folder this export created."""
    from finetune.adapters.export import _merge_folder
    from finetune.checkpoint.files import share_as_umask_allows
    from finetune.export.gguf import (
        QUANTS,
        gguf_architecture,
        modelfile,
        rope_scaling,
        write_gguf,
    )
    from finetune.export.roundtrip import prompt_ids, reference_logits, round_as_stored

    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: choose one of {', '.join(QUANTS)}.")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("GGUF export needs the Python package 'gguf' (ggml-org), which is not "
                          "installed: pip install 'finetune[gguf]' (or pip install gguf).") \
            from None
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT {out} is not an empty folder; not overwriting it. Choose a new "
                          "folder.")
    model, tokenizer, chat_template = _load_merged(source)
    gguf_architecture(model.config)  # refuse before anything is written
    rope = rope_scaling(model.config)
    inv_freq = (model.model.rotary_emb.inv_freq.detach().cpu().double().numpy()
                if rope is not None else None)
    name = out.name
    made, tmp = _merge_folder(out, "the GGUF export")
    try:
        file = tmp / f"{name}.gguf"
        if verify:
            ids, texts = prompt_ids(tokenizer, chat_template)
            expected = reference_logits(model, ids)
        write_gguf(model, tokenizer, file, quant=quant, name=name, chat_template=chat_template)
        (tmp / "Modelfile").write_text(modelfile(file.name, tokenizer, chat_template),
                                       encoding="utf-8")
        result = None
        if verify:
            from finetune.export.roundtrip import verify as round_trip

            round_as_stored(model, quant)
            stored = reference_logits(model, ids)
            del model
            result = round_trip(file, quant, ids, texts, expected, stored, chat_template,
                                rope, inv_freq)
            if not result.passed:
                report = "Try --quant f16, or report" if quant != "f16" else "Report"
                raise ExportVerificationError(
                    f"the exported GGUF does not reproduce {source}: {result.summary()}. "
                    f"Nothing was written to {out}. {report} the model's architecture and "
                    "tokenizer; --no-verify writes the file unchecked.")
        share_as_umask_allows(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        from finetune.checkpoint.store import disk_full, is_disk_full

        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full(out.parent, None, f"the GGUF file {out.name}",
                            keeps="Nothing was written there.",
                            fix="Free some space (or choose another disk for OUT), then export "
                                "again.") from None
        raise
    return out / f"{name}.gguf", result
