"""The dpo recipe's loss and reference policy on the tiny model: the loss equals a hand
computation, the adapter-disabled reference is the base model, precomputed reference log-probs
equal the per-step ones, and a short run raises the reward margin and accuracy."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.adapters import apply_adapter
from finetune.config.data import DataConfig
from finetune.config.distributed import DistributedConfig
from finetune.config.dpo import DpoConfig
from finetune.config.schema import PeftConfig
from finetune.data import DataError, build_data
from finetune.data.preference import scored_pairs
from finetune.errors import ConfigError
from finetune.models.tiny import build_tiny_tokenizer
from finetune.train.recipe import RECIPE_PACKAGE, load_recipe

recipe = importlib.import_module(f"{RECIPE_PACKAGE}.dpo")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def preference_data(tokenizer, tmp_path: Path):
    """preference_data(**data settings) -> PreferenceData of the bundled pairs."""

    def make(micro_batch_size: int = 2, **settings):
        settings.setdefault("max_seq_len", 128)
        cfg = DataConfig(path="builtin:preferences", cache_dir=str(tmp_path / "cache"),
                         **settings)
        return build_data(cfg, tokenizer, attention="sdpa", seed=0, pairs=True,
                          micro_batch_size=micro_batch_size)

    return make


def lora_policy(tiny_model_dir: Path, *, moved: bool = True) -> torch.nn.Module:
    """A LoRA policy on the tiny model; `moved` sets every LoRA B to non-zero values, so the
    policy differs from its base."""
    torch.manual_seed(0)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          PeftConfig(r=4, alpha=8))
    if moved:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return model


def logps_by_hand(model: torch.nn.Module, batch: dict) -> list[float]:
    """Each row's summed log-probability of its trained tokens, one token at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits.double()
    sums = []
    for row in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            label = int(batch["labels"][row, t])
            if label != -100:
                total += float(torch.log_softmax(logits[row, t - 1], dim=-1)[label])
        sums.append(total)
    return sums


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                 ("ipo", 0.0)])
def test_loss_equals_a_hand_computation_on_two_pairs(tiny_model_dir, preference_data, loss,
                                                     smoothing):
    batch = next(iter(preference_data().train))
    policy = lora_policy(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pi, ref = logps_by_hand(policy, batch), logps_by_hand(base, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    beta, num_items = 0.3, 5.0  # a window of 5 pairs, 2 of them here
    expected, margins = 0.0, []
    for i in range(2):
        c, r = i, i + 2
        if loss == "ipo":
            pc, pr = pi[c] / counts[c], pi[r] / counts[r]
            rc, rr = ref[c] / counts[c], ref[r] / counts[r]
        else:
            pc, pr, rc, rr = pi[c], pi[r], ref[c], ref[r]
        h = (pc - rc) - (pr - rr)
        margins.append(beta * h)
        if loss == "ipo":
            expected += (h - 1 / (2 * beta)) ** 2
        else:
            expected += (-math.log(1 / (1 + math.exp(-beta * h))) * (1 - smoothing)
                         - math.log(1 / (1 + math.exp(beta * h))) * smoothing)
    objective = recipe.DpoObjective(DpoConfig(beta=beta, loss=loss, label_smoothing=smoothing))
    out = recipe.dpo_loss(policy, batch, torch.tensor(num_items), dpo=objective)
    assert out.loss.item() == pytest.approx(expected / num_items, rel=1e-4)
    assert out.metrics["rewards/margin"].item() == pytest.approx(sum(margins) / num_items,
                                                                 rel=1e-4, abs=1e-6)
    assert out.metrics["logps/chosen"].item() == pytest.approx((pi[0] + pi[1]) / num_items,
                                                               rel=1e-4)
    accuracy = sum(m > 0 for m in margins) / num_items
    assert out.metrics["rewards/accuracy"].item() == pytest.approx(accuracy)
    assert set(out.metrics) == set(recipe.METRICS)


def test_adapter_disabled_reference_is_the_base_model(tiny_model_dir, preference_data):
    batch = next(iter(preference_data().train))
    policy = lora_policy(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = recipe.DpoObjective(DpoConfig()).reference_logps(policy, batch)
    base_logps = recipe.sequence_logps(base, batch)[0]
    policy_logps = recipe.sequence_logps(policy, batch)[0]
    assert torch.allclose(reference, base_logps, atol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-2)  # the adapter does something
    assert all(m.active_adapters == ["default"] for m in [policy])  # enabled again after


def test_padding_pairs_count_for_nothing(tiny_model_dir, preference_data):
    batch = next(iter(preference_data().train))
    batch["pair_mask"] = torch.tensor([True, False])
    objective = recipe.DpoObjective(DpoConfig())
    policy = lora_policy(tiny_model_dir)
    both = recipe.dpo_loss(policy, batch, torch.tensor(1.0), dpo=objective)
    pi, ref = logps_by_hand(policy, batch), logps_by_hand(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    h = (pi[0] - ref[0]) - (pi[2] - ref[2])
    assert both.loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * h)), rel=1e-4)
    assert scored_pairs(batch) == 1


def test_precomputed_reference_equals_the_per_step_one(tiny_model_dir, tokenizer,
                                                       tmp_path: Path):
    from finetune.data.sources import BUNDLED_DIR

    rows = (BUNDLED_DIR / "preferences.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = DataConfig(path=str(path), val_split=0.25, max_seq_len=128,
                     cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, tokenizer, attention="sdpa", seed=0, pairs=True, micro_batch_size=3)
    assert (data.num_pairs, data.num_all_pairs) == (9, 12)
    policy = lora_policy(tiny_model_dir)
    table = recipe.precompute_reference(policy, data, batch_size=5, device=torch.device("cpu"))
    assert table.shape == (12, 2)
    with_table = recipe.DpoObjective(DpoConfig(), table=table)
    per_step = recipe.DpoObjective(DpoConfig())
    for batch in [next(iter(data.train)), data.val_batches()[0]]:
        looked_up = with_table.reference_logps(policy, batch)
        assert torch.allclose(looked_up, per_step.reference_logps(policy, batch), atol=1e-4)
        batch.pop("pair_ids")  # a batch without ids: computed, not looked up
        assert torch.allclose(with_table.reference_logps(policy, batch), looked_up, atol=1e-4)


def run_config(**peft) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(name_or_path="tiny", revision=None, trust_remote_code=False,
                              cache_dir=None),
        peft=PeftConfig(**peft), dpo=DpoConfig(), trainer=SimpleNamespace(micro_batch_size=2),
        data=DataConfig(path="builtin:preferences"), distributed=DistributedConfig())


def test_full_fine_tune_reference_is_a_frozen_copy(tiny_model_dir, preference_data):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plan = SimpleNamespace(attn_implementation="sdpa", compute_dtype=torch.bfloat16,
                           autocast_dtype=torch.bfloat16)
    objective = recipe.dpo_models(run_config(method="none"), policy, plan=plan)["dpo"]
    frozen = objective.reference
    assert frozen is not None and frozen is not policy
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen.parameters())
    with torch.no_grad():
        for p in policy.parameters():  # training moves the policy; the reference stays put
            p.add_(0.01)
    batch = next(iter(preference_data().train))
    ref = objective.reference_logps(policy, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = recipe.sequence_logps(base.to(torch.bfloat16), batch)[0]
    assert torch.allclose(ref, expected, rtol=1e-3)


def test_lora_needs_no_second_model_and_precompute_needs_the_data(tiny_model_dir):
    policy = lora_policy(tiny_model_dir, moved=False)
    assert recipe.dpo_models(run_config(), policy)["dpo"].reference is None
    cfg = run_config()
    cfg.dpo = DpoConfig(precompute_ref=True)
    with pytest.raises(ConfigError, match="dpo.precompute_ref"):
        recipe.dpo_models(cfg, policy)


def test_recipe_checks_before_any_work() -> None:
    dpo = load_recipe("dpo")
    assert dpo.metrics == recipe.METRICS and dpo.num_items is scored_pairs
    dpo.check(run_config(method="none"))  # a full fine-tune is fine: a frozen copy is made
    dpo.check(run_config(method="lora"))
    cfg = run_config()
    cfg.data = DataConfig(path="x", packing=True)
    with pytest.raises(DataError, match="data.packing=true is not supported"):
        dpo.check(cfg)
    cfg = run_config()
    cfg.dpo = DpoConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="sigmoid only"):
        dpo.check(cfg)
    cfg.dpo = DpoConfig(beta=0.0)
    with pytest.raises(ConfigError, match="dpo.beta=0.0 must be positive"):
        dpo.check(cfg)
    # ZeRO-3 partitions the weights that a frozen copy or precomputation would run on.
    cfg = run_config(method="none")
    cfg.distributed = DistributedConfig(strategy="deepspeed_zero3")
    with pytest.raises(ConfigError, match="deepspeed_zero3 supports LoRA"):
        dpo.check(cfg)
    cfg = run_config(method="lora")
    cfg.distributed = DistributedConfig(strategy="deepspeed_zero3")
    dpo.check(cfg)
    cfg.dpo = DpoConfig(precompute_ref=True)
    with pytest.raises(ConfigError, match="deepspeed_zero3 supports LoRA"):
        dpo.check(cfg)


def test_a_short_run_raises_the_reward_margin_and_accuracy(tiny_model_dir, preference_data):
    data = preference_data(micro_batch_size=2, max_seq_len=96, truncation="drop")
    policy = lora_policy(tiny_model_dir, moved=False)
    objective = recipe.DpoObjective(DpoConfig())
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    held_out = data.val_batches(2)

    def measure() -> tuple[float, float]:
        policy.eval()
        with torch.no_grad():
            outs = [recipe.dpo_loss(policy, b, torch.tensor(float(scored_pairs(b))),
                                    dpo=objective) for b in held_out]
        policy.train()
        return (sum(o.metrics["rewards/margin"].item() for o in outs) / len(outs),
                sum(o.metrics["rewards/accuracy"].item() for o in outs) / len(outs))

    margin_before, accuracy_before = measure()
    batches = iter(data.train)
    for _ in range(4):
        batch = next(batches)
        out = recipe.dpo_loss(policy, batch, torch.tensor(float(scored_pairs(batch))),
                              dpo=objective)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    margin_after, accuracy_after = measure()
    assert margin_before == pytest.approx(0.0, abs=1e-6) and accuracy_before == 0.0
    assert margin_after > 0.5 and accuracy_after > 0.9
