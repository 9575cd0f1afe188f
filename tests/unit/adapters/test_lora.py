"""apply_adapter and count_parameters on the tiny model: what each peft method trains.

Expected counts come from the tiny model's config.json and the LoRA formula (r * (in + out)
per adapted Linear, plus `out` for DoRA's magnitude vector), never from peft's own counters.
"""

from __future__ import annotations

import math

import pytest
import torch

from finetune.adapters import apply_adapter, count_parameters


def _hand_total(shapes) -> int:
    """Parameters of the tiny Llama: untied embedding and head, no biases, two norms a layer."""
    per_layer = sum(i * o for i, o in shapes.linears.values()) + 2 * shapes.hidden
    return 2 * shapes.vocab * shapes.hidden + shapes.layers * per_layer + shapes.hidden


def _adapted_modules(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("method", ["lora", "dora", "rslora"])
def test_trainable_count_per_method(method, load_base, peft_cfg, tiny_shapes) -> None:
    r = 4
    model = apply_adapter(load_base(), peft_cfg(method=method, r=r, alpha=8))
    per_layer = sum(r * (i + o) + (o if method == "dora" else 0)
                    for i, o in tiny_shapes.linears.values())
    expected = tiny_shapes.layers * per_layer
    assert count_parameters(model) == (expected, _hand_total(tiny_shapes) + expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base stays frozen
    assert any("lora_magnitude_vector" in n for n in trainable) is (method == "dora")


@pytest.mark.parametrize(("method", "scaling"), [("lora", 8 / 4), ("rslora", 8 / math.sqrt(4))])
def test_scaling_per_method(method, scaling, load_base, peft_cfg) -> None:
    """rsLoRA differs from LoRA only in its scale alpha/sqrt(r); the count cannot show it."""
    model = apply_adapter(load_base(), peft_cfg(method=method, r=4, alpha=8))
    scales = [module.scaling["default"] for module in _adapted_modules(model).values()]
    assert len(scales) == 42 and scales == pytest.approx([scaling] * 42)


def test_all_linear_targets_every_linear_but_lm_head(load_base, peft_cfg) -> None:
    base_linears = {name for name, module in load_base().named_modules()
                    if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    assert len(base_linears) == 42  # 7 projections x 6 layers: the walk found the real layers
    model = apply_adapter(load_base(), peft_cfg(target_modules="all-linear"))
    assert set(_adapted_modules(model)) == base_linears


def test_target_module_list_is_honoured(load_base, peft_cfg, tiny_shapes) -> None:
    r = 2
    model = apply_adapter(load_base(), peft_cfg(r=r, target_modules=["q_proj", "v_proj"]))
    adapted = _adapted_modules(model)
    assert len(adapted) == 2 * tiny_shapes.layers
    assert {name.rsplit(".", 1)[1] for name in adapted} == {"q_proj", "v_proj"}
    shapes = tiny_shapes.linears
    expected = tiny_shapes.layers * r * (sum(shapes["q_proj"]) + sum(shapes["v_proj"]))
    assert count_parameters(model)[0] == expected


def test_method_none_trains_every_weight_of_the_same_model(load_base, peft_cfg,
                                                           tiny_shapes) -> None:
    base = load_base()
    base.requires_grad_(False)  # so the test sees apply_adapter turn every weight back on
    model = apply_adapter(base, peft_cfg(method="none"))
    assert model is base
    total = _hand_total(tiny_shapes)
    assert count_parameters(model) == (total, total)


def test_adapter_weights_stay_fp32_on_a_bf16_base(load_base, peft_cfg) -> None:
    model = apply_adapter(load_base(torch.bfloat16), peft_cfg(method="dora", r=4))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


def test_count_parameters_by_hand() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)  # 12 frozen; 4 (bias) + 8 trainable
    assert count_parameters(model) == (12, 24)
