"""Direct Preference Optimization: prefer the chosen answer over the rejected one.

    finetune run dpo [OVERRIDES...]

Config: configs/dpo.yaml (the `dpo` group: beta, loss, label_smoothing, precompute_ref; schema
in finetune/config/dpo.py). Data: preference pairs (prompt/chosen/rejected, or two conversations
that differ only in the last assistant turn); each micro-batch holds the chosen rows, then the
rejected rows, and the policy scores both in one forward pass (finetune/data/preference.py).

The loss compares the policy's log-probability margin between the two completions with the
reference policy's: sigmoid DPO (Rafailov et al., 2023), with label smoothing the conservative
variant, or IPO (Azar et al., 2023) on length-averaged log-probabilities. The reference is the
frozen base: with an adapter (peft=lora|dora|rslora|qlora) the policy itself with the adapter
disabled, so no second copy is held; with peft=none a frozen copy loaded in the plan's
precision. With dpo.precompute_ref=true the reference log-probabilities of every training pair
are computed once at setup and looked up by pair. The loss is normalised by the scored pairs of
the window; the metrics docs/recipes.md lists are too, so each step logs their window mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.nn.functional as F

from finetune.config.dpo import DpoConfig, DpoLoss, check_dpo
from finetune.data.collate import IGNORE_INDEX, LOSS_POSITIONS
from finetune.data.pairs import check_pair_settings
from finetune.data.preference import scored_pairs
from finetune.errors import ConfigError
from finetune.kernels.chunked_loss import (
    ChunkedLossHead,
    chunked_head_of,
    install_chunked_head,
    request_loss,
)
from finetune.train.loss import LossOutput, selects_logits
from finetune.train.recipe import Recipe

logger = logging.getLogger(__name__)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "logps/chosen", "logps/rejected")


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its trained tokens (fp32) and their count.

    Rows are done one at a time so that only one row's fp32 logits are alive at once. With the
    chunked loss head (finetune.kernels.chunked_loss) the model's head returns each trained
    position's label log-probability instead of logits, computed a chunk of positions at a
    time.
    """
    head = chunked_head_of(model)
    if head is not None and selects_logits(model):
        return _chunked_sequence_logps(model, head, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), use_cache=False)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0)
    sums = []
    for row in range(labels.shape[0]):
        logits = out.logits[row, :-1].float()
        picked = logits.gather(-1, targets[row, :, None]).squeeze(-1)
        token_logps = picked - torch.logsumexp(logits, dim=-1)
        sums.append((token_logps * mask[row]).sum())
    return torch.stack(sums), mask.sum(dim=1)


def _chunked_sequence_logps(model: torch.nn.Module, head: ChunkedLossHead,
                            batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    keep = batch.get(LOSS_POSITIONS)
    if keep is None:
        keep = torch.nonzero(mask.any(dim=0)).flatten()
    with request_loss(head, labels[:, keep], "token_logps", IGNORE_INDEX):
        logps = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"), logits_to_keep=keep,
                      use_cache=False).logits
    return logps.sum(dim=1), mask.sum(dim=1)


def _peft_model(model: torch.nn.Module):
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    inner = extract_model_from_parallel(model)
    return inner if isinstance(inner, PeftModel) else None


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor,
                    pair_mask: torch.Tensor, num_items: torch.Tensor, *, beta: float,
                    loss: str = DpoLoss.sigmoid, label_smoothing: float = 0.0) -> LossOutput:
    """The DPO/IPO loss of n pairs, summed over the pairs in `pair_mask`, over `num_items`.

    `policy`, `reference`, `counts`: [2n] summed completion log-probs and token counts, chosen
    rows first. IPO compares log-probs averaged over each completion's tokens (its rewards are
    then per token too); logps/* are always the summed log-probs of the policy.
    """
    n = pair_mask.shape[0]
    weight = pair_mask.to(policy.dtype)
    summed = policy
    if loss == DpoLoss.ipo:
        scale = counts.clamp(min=1).to(policy.dtype)
        policy, reference = policy / scale, reference / scale
    chosen = policy[:n] - reference[:n]
    rejected = policy[n:] - reference[n:]
    logits = chosen - rejected
    if loss == DpoLoss.ipo:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
              "rewards/margin": chosen_rewards - rejected_rewards,
              "rewards/accuracy": (chosen_rewards > rejected_rewards).to(policy.dtype),
              "logps/chosen": summed[:n].detach(), "logps/rejected": summed[n:].detach()}
    return LossOutput((losses * weight).sum() / num_items,
                      {name: (v * weight).sum() / num_items for name, v in values.items()})


class DpoObjective(torch.nn.Module):
    """What the DPO loss needs besides the policy: its settings, the reference policy (a frozen
    model, or None for the policy with its adapter disabled), and optionally the reference
    log-probs of every pair ([pairs, 2]: chosen, rejected), looked up by `pair_ids`."""

    def __init__(self, cfg: DpoConfig, *, reference: torch.nn.Module | None = None,
                 table: torch.Tensor | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.beta, self.kind, self.label_smoothing = cfg.beta, str(cfg.loss), cfg.label_smoothing
        self.reference = reference
        self.autocast_dtype = autocast_dtype
        self.register_buffer("table", table, persistent=False)

    @torch.no_grad()
    def reference_logps(self, policy: torch.nn.Module, batch: dict) -> torch.Tensor:
        """[2n] reference log-probs of the batch's completions, chosen rows first."""
        if self.table is not None and "pair_ids" in batch:
            rows = self.table[batch["pair_ids"].to(self.table.device)]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        if self.reference is not None:
            device = batch["input_ids"].device
            if next(self.reference.parameters()).device != device:
                self.reference.to(device)
            with _autocast(device, self.autocast_dtype):
                return sequence_logps(self.reference, batch)[0]
        peft_model = _peft_model(policy)
        if peft_model is None:
            raise TypeError("a DPO reference without a frozen model needs a peft policy")
        with peft_model.disable_adapter():
            return sequence_logps(policy, batch)[0]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dpo_loss(model: torch.nn.Module, batch: dict, num_items: torch.Tensor, *,
             dpo: DpoObjective) -> LossOutput:
    """The recipe's loss: one policy forward over the chosen and rejected rows, the reference
    log-probs (see DpoObjective), and `preference_loss`."""
    policy, counts = sequence_logps(model, batch)
    reference = dpo.reference_logps(model, batch)
    return preference_loss(policy, reference, counts, batch["pair_mask"], num_items,
                           beta=dpo.beta, loss=dpo.kind, label_smoothing=dpo.label_smoothing)


@torch.no_grad()
def precompute_reference(policy: torch.nn.Module, data, *, batch_size: int,
                         device: torch.device,
                         autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[pairs, 2] reference log-probs (chosen, rejected) of every pair of `data` (a
    PreferenceData; training and held-out pairs, by `pair_ids`): the policy as it is now,
    with its adapter disabled if it has one."""
    peft_model = _peft_model(policy)
    table = torch.zeros(data.num_all_pairs, 2, dtype=torch.float32, device=device)
    was_training = policy.training
    policy.eval()
    adapter_off = peft_model.disable_adapter() if peft_model else contextlib.nullcontext()
    with adapter_off, _autocast(device, autocast_dtype):
        for batch in data.pair_batches(batch_size):
            ids = batch.pop("pair_ids").to(device)
            batch = {k: v.to(device) for k, v in batch.items()}
            sums = sequence_logps(policy, batch)[0]
            table[ids] = torch.stack([sums[:len(ids)], sums[len(ids):]], dim=1)
    policy.train(was_training)
    logger.info("dpo: reference log-probs of %d pairs computed once", data.num_all_pairs)
    return table


def dpo_models(cfg, policy: torch.nn.Module, *, data=None, plan=None,
               device: torch.device | None = None) -> dict[str, torch.nn.Module]:
    """The recipe's extra models: {"dpo": DpoObjective}. `plan` (the KernelPlan) gives the
    frozen copy's precision and the autocast dtype; `data` and `device` are needed by
    dpo.precompute_ref."""
    from finetune.models import load_model

    check_dpo(cfg.dpo)
    autocast_dtype = plan.autocast_dtype if plan is not None else None
    reference = table = None
    if cfg.dpo.precompute_ref:
        if data is None or device is None:
            raise ConfigError("dpo.precompute_ref=true needs the run's data and device at setup, "
                              "which this version's setup does not hand to the recipe; set "
                              "dpo.precompute_ref=false.")
        if next(policy.parameters()).device != device:
            policy.to(device)
        table = precompute_reference(policy, data, batch_size=cfg.trainer.micro_batch_size,
                                     device=device, autocast_dtype=autocast_dtype)
    elif str(cfg.peft.method) == "none":
        reference = load_model(
            cfg.model,
            attn_implementation=(plan.attn_implementation if plan is not None
                                 else policy.config._attn_implementation),
            dtype=plan.compute_dtype if plan is not None else next(policy.parameters()).dtype)
        if chunked_head_of(policy) is not None:  # the reference's head runs as the policy's
            install_chunked_head(reference)
        reference.requires_grad_(False).eval()
        if device is not None:
            reference.to(device)
    return {"dpo": DpoObjective(cfg.dpo, reference=reference, table=table,
                                autocast_dtype=autocast_dtype)}


@dataclasses.dataclass(frozen=True)
class DpoRecipe(Recipe):
    """DPO trains an adapter or, with peft=none, every weight; checked before any work. Its
    batches hold preference pairs (`pairs`: setup builds the data with build_data(pairs=True))."""

    pairs: bool = True

    def check(self, cfg) -> None:
        trains = "all" if str(cfg.peft.method) == "none" else "adapter"
        Recipe.check(dataclasses.replace(self, trains=trains), cfg)
        check_dpo(cfg.dpo)
        check_pair_settings(cfg.data)
        if str(cfg.distributed.strategy) == "deepspeed_zero3" and (
                trains == "all" or cfg.dpo.precompute_ref):
            raise ConfigError(
                "dpo with distributed=deepspeed_zero3 supports LoRA with the reference computed "
                "each step only: the frozen reference copy of a full fine-tune and "
                "dpo.precompute_ref run outside DeepSpeed's engine on partitioned weights. Use "
                "distributed=deepspeed_zero2 or fsdp2, or peft=lora with "
                "dpo.precompute_ref=false.")


RECIPE = DpoRecipe(name="dpo", loss=dpo_loss, trains="adapter", data_formats=("preference",),
                   metrics=METRICS, extra_models=dpo_models, num_items=scored_pairs)
