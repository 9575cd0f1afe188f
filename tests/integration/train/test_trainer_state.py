"""The Trainer owns its state: a state_dict taken after k steps, loaded into a fresh Trainer,
continues exactly as the straight run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.train.loss import LossOutput, causal_lm_loss, trained_tokens
from finetune.train.recipe import Recipe


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_resume_from_state_dict_equals_the_straight_run(make_trainer, tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "straight", "trainer.max_steps=4")
    straight.fit()
    straight.close()

    first = make_trainer(tmp_path / "split", "trainer.max_steps=4")
    first.total_steps = 2  # stop half-way, as a preemption would
    first.fit()
    state = first.state_dict()
    first.close()
    torch.manual_seed(1234)  # a fresh process would not share the first one's RNG
    second = make_trainer(tmp_path / "split", "trainer.max_steps=4")
    second.load_state_dict(state, source=tmp_path / "split")
    assert second.state.step == 2
    second.fit()
    second.close()

    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    for name, tensor in second.state_dict().trainable.items():
        assert torch.equal(tensor, straight.state_dict().trainable[name]), name


def test_state_dict_holds_progress_data_position_and_rng(make_trainer, tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=3")
    trainer.fit()
    state = trainer.state_dict()
    trainer.close()
    assert state.progress["step"] == 3
    assert state.progress["tokens_seen"] == trainer.state.tokens_seen > 0
    assert state.progress["data"] == trainer.data.train.state_dict()
    assert state.progress["world_size"] == 1
    assert set(state.rng) == {0}
    assert state.trainable and all("lora_" in name for name in state.trainable)
    assert state.optimizer["state"], "the optimizer has moments after 3 steps"


def test_recipe_metrics_reach_metrics_jsonl(make_trainer, tmp_path: Path) -> None:
    def loss(model, batch, num_items):
        return LossOutput(causal_lm_loss(model, batch, num_items),
                          {"trained_share": torch.tensor(trained_tokens(batch)) / num_items})

    recipe = Recipe(name="lora_sft", loss=loss, trains="adapter", metrics=("trained_share",))
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=2",
                           "trainer.grad_accum_steps=2", recipe=recipe)
    trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    shares = [r["trained_share"] for r in rows if "loss" in r]
    assert len(shares) == 2
    assert all(abs(s - 1.0) < 1e-6 for s in shares)  # window sum of per-window shares


def test_undeclared_recipe_metric_is_refused(make_trainer, tmp_path: Path) -> None:
    def loss(model, batch, num_items):
        return LossOutput(causal_lm_loss(model, batch, num_items), {"surprise": num_items})

    recipe = Recipe(name="lora_sft", loss=loss, trains="adapter")
    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=1", recipe=recipe)
    with pytest.raises(TypeError, match="surprise"):
        trainer.fit()
    trainer.close()


def test_enospc_during_a_save_raises_disk_full_and_keeps_earlier_checkpoints(
        make_trainer, tmp_path: Path, monkeypatch) -> None:
    import errno

    from finetune.checkpoint import store
    from finetune.checkpoint.files import verify_manifest
    from finetune.errors import DiskFullError

    trainer = make_trainer(tmp_path / "run", "trainer.max_steps=2")
    trainer.fit()
    first = trainer.save_checkpoint()
    trainer.state.step += 1  # a later step to save

    def full(tmp, state, **_kwargs):
        (tmp / "trainable.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "write_state", full)
    with pytest.raises(DiskFullError, match="not enough disk space"):
        trainer.save_checkpoint()
    trainer.close()
    root = store.checkpoints_root(tmp_path / "run")
    assert not list(root.glob(".tmp-*"))
    assert verify_manifest(first) is None
    assert [s for s, _ in store.list_checkpoints(tmp_path / "run")] == [2]


def test_a_learning_rate_changed_on_resume_is_used(make_trainer, tmp_path: Path) -> None:
    first = make_trainer(tmp_path / "run", "trainer.max_steps=8", "optim.lr=2e-3")
    first.total_steps = 6  # past the 5 warmup steps
    first.fit()
    state = first.state_dict()
    first.close()
    same = make_trainer(tmp_path / "same", "trainer.max_steps=8", "optim.lr=2e-3")
    same.load_state_dict(state, source=tmp_path / "run")
    changed = make_trainer(tmp_path / "changed", "trainer.max_steps=8", "optim.lr=1e-3")
    changed.load_state_dict(state, source=tmp_path / "run")
    lr_same = same.optimizer.param_groups[0]["lr"]
    lr_changed = changed.optimizer.param_groups[0]["lr"]
    assert lr_same == first.optimizer.param_groups[0]["lr"] > 0
    assert lr_changed == pytest.approx(lr_same / 2)
    assert changed.scheduler.get_last_lr()[0] == pytest.approx(lr_same / 2)
    same.close()
    changed.close()


def test_the_grad_scalers_state_is_saved_and_loaded(make_trainer, tmp_path: Path) -> None:
    # fp16 runs carry a GradScaler whose scale has moved away from its start; a resume must
    # continue from the saved scale, not restart at init_scale. A CPU GradScaler stands in for
    # the one accelerate builds for fp16 on a GPU.
    saved = make_trainer(tmp_path / "run", "trainer.max_steps=1")
    saved.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    saved.acc.scaler.scale(torch.ones(()))
    saved.acc.scaler.update(2.0**10)  # as after overflows backed the scale off
    state = saved.state_dict()
    assert state.scaler["scale"] == 2.0**10

    # A run without a scaler (bf16 or fp32) resumes an fp16 checkpoint, ignoring its scaler.
    saved.acc.scaler = None
    saved.load_state_dict(state, source=tmp_path / "run")
    assert saved.acc.scaler is None
    saved.close()

    resumed = make_trainer(tmp_path / "run", "trainer.max_steps=1")
    resumed.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    resumed.load_state_dict(state, source=tmp_path / "run")
    assert resumed.acc.scaler.get_scale() == 2.0**10
    resumed.close()
