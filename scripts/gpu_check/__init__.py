"""Prove the kernel plan on a real GPU and measure what a training step costs: one run, within
5 minutes on one H100-class GPU (NVIDIA or AMD), one JSON report.

    python scripts/gpu_check.py [--out report.json] [--budget-s 280] [--skip-lora] [--no-doc]
                                [--only step,syncs]
    python scripts/gpu_check.py --dry-run       # CPU: every section on tiny shapes

It needs torch, transformers, accelerate and peft, and runs from a checkout with or without
`pip install`; a section that needs one of finetune's other dependencies (hydra-core, omegaconf,
orjson, ...) on a node that lacks it says "skipped: needs ..." and the others run. A check
that does not apply to the machine is "skipped: <why>". Every section has a hard time budget,
keeps what it measured when it fails or runs out, and is written out as soon as it ends: the
JSON report, and on a GPU the run's dated section of docs/hardware-validation.md.

Sections, most valuable first (one module each; `runner` holds the shared timing and output,
`context` the shapes, the plan and the models):
  versions, plan  machine.py    versions, missing dependencies; the detected profile and plan
  step            step.py       a Llama-3-8B-shaped LoRA step on packed rows, per attention:
                                tokens/s, MFU, peak memory, losses that must agree
  syncs           syncs.py      host syncs per optimizer step, with their call sites
  op_profile      op_profile.py one profiled step: each kind of op's share of the time
  leak            leak.py       packed documents' logits and gradients equal each one alone
  selfcheck       selfcheck.py  the attention self-checks at training shapes
  sdpa_backend    sdpa_backend.py  the SDPA backend that ran against the one the plan claimed
  loss_parity, lora_forward, liger  parity.py  fast paths against their references
  resume          resume.py     k steps, checkpoint, resume: bitwise the losses of N straight
  fsdp2           fsdp2.py      finetune's FSDP2 engine on one GPU against the unsharded losses
  adamw, tf32     numerics.py   fused vs foreach AdamW; the TF32 state against the plan
  memory, gemm    memory.py     peak memory per attention; a bf16 matmul against the peak
  lora            lora_run.py   `finetune run lora_sft` of a ~1B Llama end to end
  multi_gpu       multi_gpu.py  with 2+ GPUs: an all-reduce and a `--nproc 2` run
"""
