"""QLoRA on the CPU: after the 4-bit load is prepared for training, no weight still points into
the memory-mapped safetensors file, so the map (and the full-precision pages read to quantise
the linear layers) leaves the process; the tied embedding and output head stay one tensor."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = [
    pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'finetune[qlora]')"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps"),
]


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                low, high = fields[0].split("-")
                ranges.append((int(low, 16), int(high, 16)))
    return ranges


def _inside(model: torch.nn.Module, ranges: list[tuple[int, int]]) -> list[str]:
    return [name for name, tensor in [*model.named_parameters(remove_duplicate=False),
                                      *model.named_buffers(remove_duplicate=False)]
            if any(low <= tensor.untyped_storage().data_ptr() < high for low, high in ranges)]


@pytest.fixture
def tied_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied",
                                                             safe_serialization=True)
    return tmp_path / "tied"


def test_no_weight_points_into_the_weights_file_after_a_qlora_load(tied_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune.adapters.qlora import mapped_tensors, prepare_quantized, quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        tied_model_dir, dtype=torch.float32, quantization_config=quantization_config(torch.float32))
    weights = (tied_model_dir / "model.safetensors").resolve()
    # What transformers leaves today: the embedding (and the head tied to it) read in place.
    assert "model.embed_tokens.weight" in _inside(model, _mapped_ranges(weights))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        before = model(input_ids=ids).logits

    model = prepare_quantized(model)
    gc.collect()

    assert _inside(model, _mapped_ranges(weights)) == []
    assert mapped_tensors(model) == []
    assert _mapped_ranges(weights) == []  # the file's map is closed: its pages left the process
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
