"""`KernelPlan`: the planner's result, read by every component through typed accessors.

It holds one `FamilyDecision` per op family (`FAMILIES`) plus the environment the plan needs;
`to_dict()` is kernel_plan.json. Components ask it questions (`plan.compute_dtype`,
`plan.fused_ops`, ...) instead of digging through the decisions' details. The family modules
never import this one, so choosing a candidate and reading a plan cannot form a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from finetune.hardware.profile import HardwareProfile
from finetune.kernels.registry import FamilyDecision, ModelFacts

FAMILIES: tuple[str, ...] = (
    "attention", "optimizer", "fused_ops", "lora", "compile", "precision", "collective"
)
# Precision names used in kernel_plan.json and ModelFacts.dtype -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# Precision choice -> accelerate's `Accelerator(mixed_precision=...)`; fp32 runs with "no".
_ACCELERATE_MIXED_PRECISION: dict[str, str] = {"bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class KernelPlan:
    """The chosen kernels for one run. `to_dict()` is kernel_plan.json."""

    hardware: HardwareProfile
    kernels: dict[str, FamilyDecision]
    env: dict[str, str] = field(default_factory=dict)
    env_reasons: dict[str, str] = field(default_factory=dict)
    model_facts: ModelFacts = field(default_factory=ModelFacts)
    # kernels.autotune's outcome (finetune.kernels.tuned_plan): mode, whether candidates were
    # timed and why, the cache, the device's measured matmul TFLOP/s; None when not asked.
    autotune: dict[str, Any] | None = None

    def choice(self, family: str) -> str:
        """The chosen candidate name of `family` (one of FAMILIES)."""
        return self.kernels[family].choice

    @property
    def attn_implementation(self) -> str:
        """The value for transformers' `attn_implementation` (sdpa_cudnn loads as "sdpa")."""
        details = self.kernels["attention"].details
        return str(details.get("attn_implementation", self.choice("attention")))

    @property
    def packing(self) -> bool:
        """True when the plan was made for packed batches (`plan(..., packing=True)`)."""
        return self.model_facts.packing

    @property
    def packing_isolation(self) -> str | None:
        """varlen | block_mask_4d | flex_block_mask; None when packing cannot be isolated."""
        return self.kernels["attention"].details.get("packing_isolation")

    @property
    def cudnn_sdpa(self) -> str | None:
        """How cuDNN attention is routed for SDPA: "first" (before the other backends, for
        calls without a mask), "unmasked_only" (torch's order without a mask), or None (torch's
        defaults). Masked calls never take cuDNN unless None. See finetune.kernels.sdpa."""
        return self.kernels["attention"].details.get("cudnn_sdpa")

    @property
    def precision(self) -> str:
        """The run's precision: bf16 | fp16 | fp32."""
        return self.choice("precision")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The torch dtype of `precision` (autocast dtype, attention mask dtype)."""
        return TORCH_DTYPES[self.precision]

    @property
    def mixed_precision(self) -> str:
        """The value for accelerate's `Accelerator(mixed_precision=...)`: bf16 | fp16 | no."""
        return _ACCELERATE_MIXED_PRECISION.get(self.precision, "no")

    @property
    def base_dtype(self) -> torch.dtype:
        """dtype for frozen (base) weights: the recorded base_dtype, else the precision's."""
        details = self.kernels["precision"].details
        return TORCH_DTYPES[details.get("base_dtype", self.precision)]

    @property
    def trainable_dtype(self) -> torch.dtype:
        """dtype for the weights that train (fp32 master weights; autocast computes in
        `compute_dtype`)."""
        details = self.kernels["precision"].details
        return TORCH_DTYPES[details.get("trainable_dtype", "fp32")]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """dtype to autocast the forward to; None for no autocast."""
        return self.compute_dtype if self.kernels["precision"].details["autocast"] else None

    @property
    def grad_scaler(self) -> bool:
        """True when the loss must be scaled (fp16)."""
        return bool(self.kernels["precision"].details["grad_scaler"])

    @property
    def tf32(self) -> bool:
        """True when fp32 matmuls may use TF32 on this machine."""
        return bool(self.kernels["precision"].details.get("tf32"))

    @property
    def optimizer(self) -> str:
        """The optimizer choice, as `build_optimizer` takes it."""
        return self.choice("optimizer")

    @property
    def compile(self) -> bool:
        """True when the model is to be wrapped in torch.compile."""
        return self.choice("compile") == "on"

    @property
    def collective(self) -> str:
        """The torch.distributed backend: gloo | nccl | xccl."""
        return self.choice("collective")

    @property
    def fused_ops(self) -> tuple[str, ...]:
        """The Liger ops to patch into the model (see `apply_fused_ops`); () for none."""
        return tuple(self.kernels["fused_ops"].details["ops"])

    @property
    def loss_head(self) -> str:
        """How the LM head and its loss run: liger | chunked | unfused (see
        `finetune.kernels.loss_head`; `apply_loss_head` installs the chunked one)."""
        details = self.kernels["fused_ops"].details
        default = "liger" if "fused_linear_cross_entropy" in details["ops"] else "unfused"
        return str(details.get("loss_head", default))

    @property
    def lora(self) -> str:
        """How LoRA linear layers compute: fused | peft (see `apply_lora_kernel`)."""
        return self.choice("lora")

    @property
    def measured_tflops(self) -> float | None:
        """The device's measured dense matmul rate (TFLOP/s) in the run's precision (fp16 is
        read as bf16's); None when it was not measured."""
        rates = (self.autotune or {}).get("matmul_tflops") or {}
        return rates.get("fp32" if self.precision == "fp32" else "bf16")

    def to_dict(self) -> dict[str, Any]:
        """{"hardware": {...}, "kernels": {family: {...}}, "env": {...}} (+ "autotune")."""
        result = {
            "hardware": self.hardware.to_dict(),
            "kernels": {name: self.kernels[name].to_dict() for name in FAMILIES},
            "env": dict(self.env),
        }
        if self.autotune is not None:
            result["autotune"] = dict(self.autotune)
        return result
