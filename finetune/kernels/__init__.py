"""Kernel choice per op family: `plan(profile, cfg) -> KernelPlan`, self-checked and explained."""

from finetune.kernels.attention import (
    ATTENTION,
    AttentionCandidate,
    packing_isolation,
    supports_packing,
)
from finetune.kernels.fused_ops import apply_fused_ops
from finetune.kernels.optimizer import OPTIMIZER, OptimizerCandidate, build_optimizer
from finetune.kernels.planner import (
    FAMILIES,
    KernelPlan,
    KernelRegistries,
    apply_env,
    default_registries,
    format_plan_table,
    plan,
)
from finetune.kernels.registry import (
    Candidate,
    FamilyDecision,
    KernelOverrideError,
    ModelFacts,
    Registry,
    Rejection,
)

__all__ = [
    "ATTENTION",
    "FAMILIES",
    "OPTIMIZER",
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
    "apply_fused_ops",
    "build_optimizer",
    "default_registries",
    "format_plan_table",
    "packing_isolation",
    "plan",
    "supports_packing",
]
