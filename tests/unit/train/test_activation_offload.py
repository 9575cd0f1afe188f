"""trainer.activation_offload: the saved-tensor hooks' bookkeeping on a simulated device (CPU
tensors standing in for GPU ones, a recording fake for the streams), the refusal per hardware
profile, and on a real GPU the same gradients with less device memory held."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from finetune.errors import ConfigError
from finetune.hardware import profile_by_name
from finetune.train.activation_offload import (
    ActivationOffload,
    CudaTransfers,
    check_activation_offload,
    offload_refusal,
    with_activation_offload,
)


class FakeTransfers:
    """Transfers on the CPU: 'device' tensors are CPU tensors; every operation is recorded."""

    device_type = "cpu"

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.events = 0
        self.storages: set[int] = set()  # where the tensors sent to the host live

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        self.events += 1
        self.storages.add(tensor.untyped_storage().data_ptr())
        self.log.append(("to_host", self.events))
        return tensor.detach().clone(), self.events

    def wait(self, event: Any) -> None:
        self.log.append(("wait", event))

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        self.log.append(("to_device", 0))
        return host.clone()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
                                 for _ in range(6)], torch.nn.Linear(64, 8))


def _grads(model: torch.nn.Module, hooks: ActivationOffload | None) -> list[torch.Tensor]:
    model.zero_grad()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).square().sum()

    run = loss_fn if hooks is None else with_activation_offload(loss_fn, hooks)
    run(model, x).backward()  # the backward runs outside the hooks' context
    return [p.grad.clone() for p in model.parameters()]


def test_offloaded_activations_give_the_same_gradients_and_skip_weights() -> None:
    model = _model()
    fake = FakeTransfers()
    hooks = ActivationOffload(fake, min_bytes=1024, max_stash=2)
    reference = _grads(model, None)
    offloaded = _grads(model, hooks)
    assert all(torch.equal(a, b) for a, b in zip(reference, offloaded, strict=True))
    # The 32 x 64 fp32 activations (8 KiB: 13 of them) go to the host; the weights the
    # backward needs (saved as transposed views of the parameters: 6) stay.
    assert hooks.offloaded >= 13 and hooks.kept >= 6
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not fake.storages & weights
    copies = sum(1 for op, _ in fake.log if op == "to_host")
    assert copies == hooks.offloaded
    # Only the tensors no longer stashed come back through a copy: the last two were still on
    # the device when the backward asked for them.
    assert sum(1 for op, _ in fake.log if op == "to_device") == hooks.offloaded - 2
    assert hooks.stash == {}


def test_a_device_tensor_is_dropped_only_after_its_copy_is_waited_for() -> None:
    fake = FakeTransfers()
    hooks = ActivationOffload(fake, min_bytes=1024, max_stash=3)
    _grads(_model(), hooks)
    waited: set[int] = set()
    for i, (op, event) in enumerate(fake.log):
        if op == "wait":
            # Every wait is for an event already recorded, each once, in recording order.
            assert event <= sum(1 for o, _ in fake.log[:i] if o == "to_host")
            assert event not in waited and all(event > w for w in waited)
            waited.add(event)
        if op == "to_host":  # the stash never holds more than max_stash device tensors
            assert sum(1 for o, _ in fake.log[:i + 1] if o == "to_host") - len(waited) <= 3


def test_small_tensors_and_other_devices_stay() -> None:
    fake = FakeTransfers()
    fake.device_type = "cuda"  # the model's CPU tensors are then on "another device"
    hooks = ActivationOffload(fake, min_bytes=1)
    _grads(_model(), hooks)
    assert hooks.offloaded == 0 and fake.log == []
    big = ActivationOffload(FakeTransfers(), min_bytes=2**30)
    _grads(_model(), big)
    assert big.offloaded == 0 and big.kept > 0


@pytest.mark.parametrize("profile, refused", [
    ("cpu", "activations already live in host memory"), ("mps", "share one memory"),
    ("h100", None), ("mi300x", None), ("gh200", None),
    ("xpu-max1550", "not yet on Intel XPUs")])
def test_refused_where_it_cannot_help_with_the_reason_and_the_fix(profile: str,
                                                                 refused: str | None) -> None:
    hardware = profile_by_name(profile)
    check_activation_offload(False, hardware)  # off is never refused
    if refused is None:
        assert offload_refusal(hardware) is None
        check_activation_offload(True, hardware)
        return
    with pytest.raises(ConfigError) as err:
        check_activation_offload(True, hardware)
    text = str(err.value)
    assert text.startswith("trainer.activation_offload=true: ") and refused in text
    assert "Set trainer.activation_offload=false" in text
    assert "trainer.gradient_checkpointing=true" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_on_a_gpu_the_gradients_match_and_less_device_memory_is_held() -> None:
    model = _model().cuda()
    torch.manual_seed(0)
    x = torch.randn(4096, 64, device="cuda")

    def held(hooks: ActivationOffload | None) -> tuple[int, list[torch.Tensor]]:
        model.zero_grad()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        if hooks is None:
            loss = model(x).square().sum()
        else:
            with hooks:
                loss = model(x).square().sum()
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        return kept, [p.grad.clone() for p in model.parameters()]

    plain_bytes, plain = held(None)
    hooks = ActivationOffload(CudaTransfers(), max_stash=2)
    offload_bytes, offloaded = held(hooks)
    assert hooks.offloaded > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded, strict=True))
    assert offload_bytes < plain_bytes / 2
