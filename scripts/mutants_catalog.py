"""What scripts/mutants.py mutates: the modules that carry the README's promises, the tests that
cover each one (only these run against its mutants), and the curated mutations.

A curated mutation replaces `find` (which must occur exactly once in the module) by `replace`.
The first ones of each module are the changes a past mutation pass found unnoticed (see
docs/testing.md); the rest are the plausible slips of that module. `generic` is how many generic
mutants (comparison flipped, `and`/`or` swapped, slice bound + 1, call statement dropped) are
taken, spread evenly, from the listed `functions`. Tests are pytest arguments, so a slow case
can be left out with --deselect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Curated:
    path: str
    find: str
    replace: str
    tests: tuple[str, ...] = ()  # default: the module's tests


_PACKING_TESTS = [
    "tests/unit/data/test_data_packing.py",
    "tests/unit/kernels/test_packing_leak.py",
]

MODULES: dict[str, dict] = {
    "finetune/data/encode/assembly.py": {
        "tests": ["tests/unit/data/test_data_assemble.py", "tests/unit/data/test_data_template.py"],
        "functions": ["assemble"], "generic": 4},
    "finetune/data/packing.py": {
        "tests": _PACKING_TESTS, "functions": ["pack_documents"], "generic": 2},
    "finetune/data/collate.py": {
        "tests": ["tests/unit/data/test_collate_padding.py",
                  "tests/unit/train/test_loss_positions.py", *_PACKING_TESTS],
        "functions": ["Collator.__call__", "sequence_boundaries"], "generic": 3},
    "finetune/train/loss.py": {
        "tests": ["tests/unit/train/test_loss_grad_scale.py", "tests/unit/train/test_loss.py",
                  "tests/unit/train/test_loss_positions.py"],
        "functions": ["causal_lm_loss", "accumulate_gradients"], "generic": 3},
    "finetune/train/trainer.py": {
        "tests": ["tests/integration/train/test_trainer_state.py", "tests/integration/train/test_resume_rng.py",
                  "tests/integration/train/test_data_position.py",
                  "tests/integration/train/test_resume_schedule.py"],
        "functions": ["Trainer.load_state_dict"], "generic": 2},
    "finetune/checkpoint/files.py": {
        "tests": ["tests/unit/checkpoint/test_manifest_files.py",
                  "tests/unit/checkpoint/test_store.py"],
        "functions": ["verify_manifest", "write_manifest"], "generic": 2},
    "finetune/checkpoint/store.py": {
        "tests": ["tests/unit/checkpoint/test_store.py"],
        "functions": ["latest_complete_checkpoint", "list_checkpoints", "apply_retention"],
        "generic": 3},
    "finetune/checkpoint/compat.py": {
        "tests": ["tests/unit/checkpoint/test_resume_changes.py"],
        "functions": ["config_changes", "global_batch_changes"], "generic": 2},
    "finetune/distributed/engine.py": {
        "tests": ["tests/unit/distributed/test_replicated_optimizer_state.py",
                  "tests/unit/distributed/test_deepspeed_checkpoint_refused.py",
                  "tests/integration/distributed/test_sharded_optimizer_state.py",
                  "tests/unit/distributed/test_shards_one_process.py",
                  "tests/integration/distributed/test_engine.py"],
        "functions": ["load_shards", "Replicated.load_state"], "generic": 1},
    "finetune/distributed/deepspeed_config.py": {
        "tests": ["tests/unit/distributed/test_deepspeed.py"],
        "functions": ["check_overrides", "build_config"], "generic": 3},
    "recipes/dpo.py": {
        "tests": ["tests/integration/train/test_dpo.py"],
        "functions": ["preference_loss", "sequence_logps"], "generic": 2},
    "finetune/kernels/lora_linear.py": {
        "tests": ["tests/unit/kernels/test_lora_linear.py"],
        "functions": ["fused_lora_forward"], "generic": 2},
    "finetune/kernels/varlen_sdpa.py": {
        "tests": ["tests/unit/kernels/test_varlen_sdpa.py"],
        "functions": ["_LengthsOfLastRow.__call__", "document_lengths"], "generic": 2},
    "finetune/kernels/planner.py": {
        "tests": ["tests/unit/kernels/test_kernel_selfcheck.py",
                  "tests/unit/kernels/test_kernel_plan_golden.py",
                  "tests/unit/kernels/test_kernel_overrides.py",
                  "tests/unit/kernels/test_kernel_attention_ranking.py",
                  "tests/unit/kernels/test_autotune.py",
                  "tests/unit/kernels/test_loss_head_plan.py"],
        "functions": ["_select"], "generic": 3},
    "finetune/distributed/memory.py": {
        "tests": ["tests/unit/distributed/test_memory_gathered.py",
                  "tests/unit/distributed/test_memory_fsdp2_gradients.py",
                  "tests/unit/distributed/test_memory.py"],
        "functions": ["Workload.estimate"], "generic": 3},
    "finetune/kernels/chunked_loss.py": {
        "tests": ["tests/unit/kernels/test_chunked_loss.py"],
        "functions": ["_run", "_LinearCrossEntropy.backward", "install_chunked_head"],
        "generic": 3},
    "finetune/kernels/autotune.py": {
        "tests": ["tests/unit/kernels/test_autotune.py", "tests/unit/commands/test_env_autotune.py"],
        "functions": ["within_noise", "pick", "auto_decision"], "generic": 3},
    "finetune/kernels/loss_head.py": {
        "tests": ["tests/unit/kernels/test_loss_head_plan.py"],
        "functions": ["loss_heads_for", "setting_reason"], "generic": 2},
    "finetune/distributed/checkpointing.py": {
        "tests": ["tests/unit/distributed/test_checkpointing.py",
                  "tests/unit/train/test_checkpointing_auto.py"],
        "functions": ["choose_checkpointing", "with_checkpointing"], "generic": 3},
}

# Must be killed before anything else runs: it proves the copy's code is what the tests import.
CANARY = Curated("finetune/train/loss.py",
                 'return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())', "return 0")

CURATED: list[Curated] = [
    # -- data assembly and masking
    Curated("finetune/data/encode/assembly.py",
            "a = np.maximum(ta + shift[row], 1)", "a = np.maximum(ta + shift[row], 0)"),
    Curated("finetune/data/encode/assembly.py",
            "b = np.minimum(tb + shift[row], n[row])", "b = tb + shift[row]"),
    Curated("finetune/data/encode/assembly.py",
            "shift[first != bos] = 1", "shift[first == bos] = 1"),
    Curated("finetune/data/encode/assembly.py", "keep &= ~over\n", "pass\n"),
    Curated("finetune/data/encode/assembly.py",
            "tokens[offsets[:-1][shift[kept] == 1]] = bos", "pass"),
    # -- packing and collate
    Curated("finetune/data/packing.py",
            "if len(lengths) and int(lengths.max()) > max_seq_len:",
            "if len(lengths) and int(lengths.max()) > max_seq_len + 1:"),
    Curated("finetune/data/packing.py", "left = room - size", "left = room - size + 1"),
    Curated("finetune/data/collate.py",
            "labels[b, at:at + n] = np.where(trained, ids, IGNORE_INDEX)",
            "labels[b, at:at + n] = ids"),
    Curated("finetune/data/collate.py",
            "positions[b, at:at + n] = np.arange(n)", "positions[b, at:at + n] = np.arange(at, at + n)"),
    Curated("finetune/data/collate.py",
            "np.flatnonzero((labels[:, 1:] != IGNORE_INDEX).any(axis=0))",
            "np.flatnonzero((labels[:, :-1] != IGNORE_INDEX).any(axis=0))"),
    Curated("finetune/data/collate.py",
            "(np.arange(width)[None, :] < lengths[:, None])",
            "(np.arange(width)[None, :] <= lengths[:, None])"),
    # -- loss normalisation
    Curated("finetune/train/trainer.py", "window_tokens=window_items,", "window_tokens=items,",
            tests=("tests/e2e/test_loss_ranks.py",)),
    Curated("finetune/train/loss.py", 'ignore_index=IGNORE_INDEX, reduction="sum") / num_items',
            'ignore_index=IGNORE_INDEX, reduction="mean")'),
    Curated("finetune/train/loss.py", "term = loss.detach().to(dtype) * items",
            "term = loss.detach().to(dtype)"),
    Curated("finetune/train/loss.py", "backward(loss * grad_scale)", "backward(loss)"),
    Curated("finetune/train/loss.py", "items = float(max(window_tokens, 1))",
            "items = float(max(window_tokens // len(micro_batches), 1))"),
    # -- the trainer's state dict and resume
    Curated("finetune/train/trainer.py", "            store.restore_rng(*rng)\n",
            "            pass\n"),
    Curated("finetune/train/trainer.py",
            "return self._data_state if self._data_state is not None else "
            "self.data.train.state_dict()",
            "return self.data.train.state_dict()"),
    Curated("finetune/train/trainer.py",
            "        self.scheduler.load_state_dict(state.scheduler)\n", ""),
    Curated("finetune/train/trainer.py", "        self._use_configured_hparams(configured)\n", ""),
    # -- checkpoint store and manifest
    Curated("finetune/checkpoint/files.py",
            'if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:',
            'if path.stat().st_size != meta["bytes"]:'),
    Curated("finetune/checkpoint/store.py", "for _step, path in reversed(list_checkpoints(",
            "for _step, path in (list_checkpoints("),
    # -- the distributed engines
    # The optimizer part of a sharded checkpoint never read (dcp.load fills `state` in place).
    Curated("finetune/distributed/engine.py", "dcp.load(state, checkpoint_id=",
            'dcp.load({"model": state["model"]}, checkpoint_id='),
    Curated("finetune/distributed/engine.py",
            "        load_trainable(model, trainable, checkpoint)\n"
            "        optimizer.load_state_dict(optimizer_state)\n",
            "        load_trainable(model, trainable, checkpoint)\n"),
    Curated("finetune/distributed/deepspeed_config.py",
            '"gradient_accumulation_steps": grad_accum_steps,',
            '"gradient_accumulation_steps": 1,'),
    # -- DPO loss
    Curated("recipes/dpo.py", "- F.logsigmoid(-beta * logits) * label_smoothing)",
            "+ F.logsigmoid(-beta * logits) * label_smoothing)"),
    Curated("recipes/dpo.py", "losses = (logits - 1.0 / (2.0 * beta)) ** 2",
            "losses = (logits - 1.0 / beta) ** 2"),
    Curated("recipes/dpo.py", "return LossOutput((losses * weight).sum() / num_items,",
            "return LossOutput(losses.sum() / num_items,"),
    Curated("recipes/dpo.py", "        policy, reference = policy / scale, reference / scale\n",
            "        pass\n"),
    # -- fused LoRA forward
    Curated("finetune/kernels/lora_linear.py", "alpha=layer.scaling[name])", "alpha=1.0)"),
    Curated("finetune/kernels/lora_linear.py", "low_rank = lora_a(layer.lora_dropout[name](flat))",
            "low_rank = lora_a(flat)"),
    Curated("finetune/kernels/lora_linear.py",
            "if args or kwargs or layer.disable_adapters or layer.merged:",
            "if args or kwargs or layer.disable_adapters:"),
    # -- packed attention's cached document lengths
    Curated("finetune/kernels/varlen_sdpa.py",
            "and self._version == position_ids._version and self._length == length):",
            "and self._length == length):"),
    # -- kernel planner
    Curated("finetune/kernels/planner.py",
            "order = [c for c in ranked if verdicts[c.name][0] and c.auto]",
            "order = [c for c in ranked if verdicts[c.name][0]]"),
    Curated("finetune/kernels/planner.py", "        if requested != \"auto\":\n"
            "            raise KernelOverrideError(\n"
            "                family, requested, f\"{requested} failed its self-check: {failure}\",",
            "        if False:\n"
            "            raise KernelOverrideError(\n"
            "                family, requested, f\"{requested} failed its self-check: {failure}\","),
    # -- kernel autotuning: the measured choice, when to tune, the cache and the broadcast
    Curated("finetune/kernels/autotune.py", "return slow - fast <= NOISE * fast or overlap",
            "return slow - fast <= NOISE * fast and overlap"),
    Curated("finetune/kernels/autotune.py",
            "chosen = next(n for n in timed if n == fastest or within_noise(timings[n], best))",
            "chosen = fastest"),
    Curated("finetune/kernels/autotune.py", "if run_seconds >= AUTO_FACTOR * estimate:",
            "if run_seconds >= estimate:"),
    Curated("finetune/kernels/autotune.py", "    if under_test:\n", "    if False:\n"),
    Curated("finetune/kernels/autotune.py",
            '"shapes": shapes.signature() if shapes else None}', '"shapes": None}'),
    Curated("finetune/kernels/autotune.py",
            'all(isinstance(rates.get(k), float) for k in ("bf16", "fp32"))',
            'any(isinstance(rates.get(k), float) for k in ("bf16", "fp32"))'),
    Curated("finetune/kernels/autotune.py", "    broadcast(box)\n    return box[0]",
            "    broadcast(box)\n    return value"),
    # -- memory estimate
    Curated("finetune/distributed/memory.py", "gradients=grads + unsharded_grads,",
            "gradients=grads,"),
    Curated("finetune/distributed/memory.py", "grads *= DDP_GRADIENT_COPIES", "pass"),
    Curated("finetune/distributed/memory.py",
            "layer_bytes * (2 if self.reshard_after_forward else s.layers)",
            "layer_bytes * (1 if self.reshard_after_forward else s.layers)"),
    # -- the chunked linear + cross-entropy (kernels.fused_linear_cross_entropy=auto on CPU)
    Curated("finetune/kernels/chunked_loss.py",  # an ignored position's loss counted
            "values = values.masked_fill(~valid, 0.0)", "values = values"),
    Curated("finetune/kernels/chunked_loss.py",  # the last, partial chunk dropped
            "for start in range(0, n, rows):", "for start in range(0, n - rows + 1, rows):"),
    Curated("finetune/kernels/chunked_loss.py",  # the backward ignores grad_output
            "hidden = (grads.hidden.float() * scale).to(grads.hidden.dtype)",
            "hidden = grads.hidden"),
    Curated("finetune/kernels/chunked_loss.py",
            "weight = None if grads.weight is None else grads.weight * scale",
            "weight = None if grads.weight is None else grads.weight"),
    Curated("finetune/kernels/chunked_loss.py",  # the trainable head's weight gradient dropped
            "(need[0], need[1] and not defer, need[2] and not defer))",
            "(need[0], False, need[2] and not defer))"),
    Curated("finetune/kernels/chunked_loss.py",  # the log-probability's sign
            "values = (picked - lse) if per_token else (lse - picked)",
            "values = (lse - picked) if per_token else (lse - picked)"),
    Curated("finetune/kernels/chunked_loss.py",  # logits in fp32 under bf16 autocast
            "return torch.get_autocast_dtype(device)",
            "return torch.promote_types(hidden.dtype, weight.dtype)"),
    Curated("finetune/kernels/chunked_loss.py",  # the budget counted in 2-byte logits
            "return max(1, budget // (4 * vocab))", "return max(1, budget // (2 * vocab))"),
    Curated("finetune/kernels/chunked_loss.py",  # the summed loss averaged instead
            "return values if per_token else values.sum()",
            "return values if per_token else values.mean()"),
    # The chunked head's loss not divided by the window's token count.
    Curated("finetune/train/loss.py",
            "return model(**inputs, logits_to_keep=keep, use_cache=False).logits / num_items",
            "return model(**inputs, logits_to_keep=keep, use_cache=False).logits",
            tests=("tests/unit/kernels/test_chunked_loss.py",)),
    # The loss positions of a batch without them: only those trained in every row.
    Curated("finetune/train/loss.py",
            "keep = torch.nonzero((targets != IGNORE_INDEX).any(dim=0)).flatten()",
            "keep = torch.nonzero((targets != IGNORE_INDEX).all(dim=0)).flatten()"),
    # -- the collate's host-side boundaries and loss positions
    Curated("finetune/data/collate.py",  # cu_seq_lens without its leading 0
            "offsets = torch.from_numpy(np.cumsum([0, *lengths]).astype(np.int32))",
            "offsets = torch.from_numpy(np.cumsum(lengths).astype(np.int32))"),
    Curated("finetune/data/collate.py",  # max_length the row's, not the longest document's
            "longest = max(lengths, default=0)", "longest = sum(lengths)"),
    Curated("finetune/data/collate.py",  # a position kept only when every row trains it
            "np.flatnonzero((labels[:, 1:] != IGNORE_INDEX).any(axis=0))",
            "np.flatnonzero((labels[:, 1:] != IGNORE_INDEX).all(axis=0))"),
    # -- the loss-head candidates
    Curated("finetune/kernels/loss_head.py",  # the self-check's reference a mean, not a sum
            'return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,\n'
            '                           ignore_index=ignore_index, reduction="sum")',
            'return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,\n'
            '                           ignore_index=ignore_index, reduction="mean")'),
    Curated("finetune/kernels/loss_head.py",
            "default_rank=1, loss=_chunked_loss)", "default_rank=3, loss=_chunked_loss)"),
    Curated("finetune/kernels/loss_head.py",
            'SETTING_TO_CANDIDATE: dict[str, str] = {"on": "liger", "chunked": "chunked", '
            '"off": "unfused"}',
            'SETTING_TO_CANDIDATE: dict[str, str] = {"on": "liger", "chunked": "chunked", '
            '"off": "chunked"}'),
    Curated("finetune/kernels/loss_head.py", "    if fused_ops != \"liger\":",
            "    if fused_ops == \"liger\":"),
    Curated("finetune/kernels/loss_head.py", "    elif not liger_flce[0]:",
            "    elif liger_flce[0]:"),
    # -- gradient checkpointing's auto
    Curated("finetune/distributed/checkpointing.py",  # the 90% margin dropped
            "limit = FIT_FRACTION * budget.bytes", "limit = budget.bytes"),
    Curated("finetune/distributed/checkpointing.py",  # the budget comparison flipped
            "if without.total <= limit:", "if without.total >= limit:"),
    Curated("finetune/distributed/checkpointing.py",  # the estimate with checkpointing compared
            "without = replace(workload, gradient_checkpointing=False).estimate(",
            "without = replace(workload, gradient_checkpointing=True).estimate("),
    Curated("finetune/distributed/checkpointing.py",  # the estimate of another strategy
            "        str(strategy.strategy), world, offload)\n    limit",
            "        \"single\", world, offload)\n    limit"),
    Curated("finetune/distributed/checkpointing.py",  # a GPU shared by processes: whole memory
            "budget = device_budget(profile, local_processes)",
            "budget = device_budget(profile, 1)"),
    Curated("finetune/distributed/checkpointing.py",  # CPU: this process's memory not added
            "return Budget(available + own_rss,", "return Budget(available,"),
]
