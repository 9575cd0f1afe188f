"""Kernel choice per op family, in three steps: `plan(profile, cfg, packing=...) -> KernelPlan`
chooses (its environment applied before its self-checks; each choice explained),
`apply_env` / `apply_fused_ops` / `apply_lora_kernel` carry the plan out on this process, and
`format_plan_table` shows it."""

from finetune.kernels.apply import (
    apply_env,
    apply_env_vars,
    apply_fused_ops,
    apply_lora_kernel,
    apply_loss_head,
    route_sdpa,
)
from finetune.kernels.attention import (
    ATTENTION,
    AttentionCandidate,
    packing_isolation,
    supports_packing,
)
from finetune.kernels.kernel_plan import FAMILIES, TORCH_DTYPES, KernelPlan
from finetune.kernels.optimizer import OPTIMIZER, OptimizerCandidate, build_optimizer
from finetune.kernels.planner import KernelRegistries, check_choices, default_registries, plan
from finetune.kernels.registry import (
    Candidate,
    FamilyDecision,
    KernelOverrideError,
    ModelFacts,
    Registry,
    Rejection,
)
from finetune.kernels.table import format_plan_table

__all__ = [
    "ATTENTION",
    "FAMILIES",
    "OPTIMIZER",
    "TORCH_DTYPES",
    "AttentionCandidate",
    "Candidate",
    "FamilyDecision",
    "KernelOverrideError",
    "KernelPlan",
    "KernelRegistries",
    "ModelFacts",
    "OptimizerCandidate",
    "Registry",
    "Rejection",
    "apply_env",
    "apply_env_vars",
    "apply_fused_ops",
    "apply_loss_head",
    "apply_lora_kernel",
    "build_optimizer",
    "check_choices",
    "default_registries",
    "format_plan_table",
    "packing_isolation",
    "plan",
    "route_sdpa",
    "supports_packing",
]
