"""What may change between a checkpoint's config and the resuming run's config."""

from __future__ import annotations

from omegaconf import OmegaConf

from finetune.errors import CheckpointError

# Keys whose change would silently corrupt the run: another model, adapter shape, data or order.
REFUSED_PREFIXES = ("model.", "peft.", "data.", "seed")
# How the run was started, not what it trains: never reported as a change.
RUN_CONTROL = ("resume", "resume_force", "output_dir")
# Their product with the number of processes is the global batch.
BATCH_KEYS = ("trainer.micro_batch_size", "trainer.grad_accum_steps")


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _flat_saved(saved_yaml: str) -> dict[str, object]:
    return _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))


def config_changes(saved_yaml: str, current: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint value, current value) for every differing leaf."""
    saved = _flat_saved(saved_yaml)
    now = _flatten(current)
    keys = sorted(set(saved) | set(now))
    return [(k, saved.get(k), now.get(k)) for k in keys
            if k not in RUN_CONTROL and saved.get(k) != now.get(k)]


def global_batch_changes(saved_yaml: str, current: dict, saved_world_size: int | None,
                         world_size: int | None) -> list[str]:
    """The change of processes since the checkpoint, and of the global batch (rows per
    optimizer step: trainer.micro_batch_size x trainer.grad_accum_steps x processes) that
    comes with it or with a batch setting. Empty when neither changed, or when the checkpoint
    does not say how many processes wrote it."""
    if saved_world_size is None or world_size is None:
        return []
    saved, now = _flat_saved(saved_yaml), _flatten(current)

    def global_batch(config: dict[str, object], processes: int) -> int | None:
        micro, accum = (config.get(key) for key in BATCH_KEYS)
        if not isinstance(micro, int) or not isinstance(accum, int):
            return None
        return micro * accum * processes

    changes = []
    if saved_world_size != world_size:
        changes.append(f"world size: {saved_world_size} -> {world_size} processes")
    before, after = global_batch(saved, saved_world_size), global_batch(now, world_size)
    if before is not None and after is not None and before != after:
        changes.append(f"global batch: {before} -> {after} rows per optimizer step "
                       f"({' x '.join(BATCH_KEYS)} x processes)")
    return changes


def check_resume_compatible(saved_yaml: str, current: dict, *, force: bool, checkpoint: str,
                            saved_world_size: int | None = None,
                            world_size: int | None = None) -> tuple[list[str], list[str]]:
    """Refuse changes that would corrupt the run; return (allowed, forced) change descriptions.

    Everything else (run length, logging, eval and save cadence, batch shape, kernels) is
    allowed and listed, so the user sees what differs from the checkpoint; so is another
    number of processes (`saved_world_size` wrote the checkpoint, `world_size` resumes it) and
    the global batch it changes (`global_batch_changes`).
    With `force`, refused changes are accepted and returned as `forced` so they can be recorded.
    """
    allowed = global_batch_changes(saved_yaml, current, saved_world_size, world_size)
    refused = []
    for key, old, new in config_changes(saved_yaml, current):
        text = f"{key}: {old!r} -> {new!r}"
        if key.startswith(REFUSED_PREFIXES):
            refused.append(text)
        else:
            allowed.append(text)
    if refused and not force:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: these changes would corrupt the run:\n  "
            + "\n  ".join(refused)
            + "\nRevert them, start a new run in another output_dir, or add resume_force=true "
            "to resume anyway (recorded in the run's summary).")
    return allowed, refused if force else []
