"""One side of scripts/bench.py: TRL's SFTTrainer on the same model, data and settings.

    python scripts/bench_trl.py WORKDIR MODE RESULT_JSON

MODE `default` runs SFTTrainer with its defaults (padded batches); `packed` with its own packing
(`packing=True`: best-fit-decreasing, padding-free rows). Set to match finetune's run: the model
folder loaded in the kernel plan's base dtype with the plan's attention (transformers' `sdpa`
where the plan picks finetune's `sdpa_varlen`, see bench_workload.trl_attention), LoRA r/alpha
on every linear layer, AdamW (TRL's default, fused), the learning rate (constant, no warmup), gradient
clipping at 1.0, max_length = data.max_seq_len, the micro-batch size, the precision (bf16
autocast when the plan picks it), the loss on assistant tokens only, and gradient checkpointing
as settings.json says (off unless bench_memory.py turns it on for every side; SFTConfig turns it
on by default, which would cost TRL a third more compute). The dataset is read with
`datasets.load_dataset("json", ...)`, as TRL's docs do.

Real tokens are counted on each training step's inputs with the one rule of
bench_workload.real_tokens; the clock is read at `on_step_end` (after the optimizer step). On a
GPU the step's document lengths (for its model FLOPs) and the peak device memory are recorded
too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench_workload import load_side_model, read_side, real_tokens


def sft_config_kwargs(settings: dict, plan: dict, *, packing: bool, output_dir: Path,
                      use_cpu: bool) -> dict:
    """The SFTConfig arguments of this workload (everything not named stays TRL's default)."""
    return {
        "output_dir": str(output_dir), "max_steps": settings["steps"],
        "per_device_train_batch_size": settings["micro_batch_size"],
        "gradient_accumulation_steps": 1, "learning_rate": settings["lr"],
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "max_length": settings["max_seq_len"], "packing": packing,
        "bf16": plan["precision"] == "bf16", "fp16": plan["precision"] == "fp16",
        "gradient_checkpointing": bool(settings.get("gradient_checkpointing", False)),
        "assistant_only_loss": True, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": settings["seed"],
        "use_cpu": use_cpu,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    workdir, mode, result_path = Path(argv[0]), argv[1], Path(argv[2])
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.metrics.flops import document_lengths

    settings, plan = read_side(workdir, mode)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = load_side_model(workdir / "model", plan,
                            attention=plan.get("trl_attention", plan["attention"]))
    dataset = load_dataset("json", data_files=str(workdir / "data.jsonl"), split="train")
    step_tokens: list[int] = []
    step_padded: list[int] = []
    step_documents: list[list[int]] = []
    on_gpu = plan["device"] == "cuda"
    step_ends: list[float] = []
    step_cpu: list[float] = []
    losses: list[float] = []
    first_unix: list[float] = []
    # A tokenizer without a pad token pads with EOS, in TRL as in finetune.
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            step_cpu.append(time.process_time())
            if not first_unix:
                first_unix.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(real_tokens(inputs, pad_id))
            step_padded.append(inputs["input_ids"].numel())
            if on_gpu:
                step_documents.append(document_lengths(
                    {k: inputs[k].cpu() for k in ("input_ids", "position_ids", "attention_mask")
                     if k in inputs}))
            return super().training_step(model, inputs, num_items_in_batch)

    args = SFTConfig(**sft_config_kwargs(settings, plan, packing=mode == "packed",
                                         output_dir=workdir / "trl_out" / result_path.stem,
                                         use_cpu=plan["device"] == "cpu"))
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    result_path.write_text(json.dumps({
        "step_ends": step_ends, "step_cpu": step_cpu, "losses": losses,
        "step_tokens": step_tokens, "step_padded": step_padded,
        "step_documents": step_documents,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "first_step_end_unix": first_unix[0] if first_unix else None}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
