"""What may change between a checkpoint's config and the resuming run's config."""

from __future__ import annotations

from omegaconf import OmegaConf

from finetune.errors import CheckpointError

# Keys whose change would silently corrupt the run: another model, adapter shape, data or order.
REFUSED_PREFIXES = ("model.", "peft.", "data.", "seed")
# How the run was started, not what it trains: never reported as a change.
RUN_CONTROL = ("resume", "resume_force", "output_dir")


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_changes(saved_yaml: str, current: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint value, current value) for every differing leaf."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    now = _flatten(current)
    keys = sorted(set(saved) | set(now))
    return [(k, saved.get(k), now.get(k)) for k in keys
            if k not in RUN_CONTROL and saved.get(k) != now.get(k)]


def check_resume_compatible(saved_yaml: str, current: dict, *, force: bool,
                            checkpoint: str) -> tuple[list[str], list[str]]:
    """Refuse changes that would corrupt the run; return (allowed, forced) change descriptions.

    Everything else (run length, logging, eval and save cadence, batch shape, kernels) is
    allowed and listed, so the user sees what differs from the checkpoint.
    With `force`, refused changes are accepted and returned as `forced` so they can be recorded.
    """
    allowed, refused = [], []
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
