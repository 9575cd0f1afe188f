"""What the engine tests share: a stand-in for accelerate's Accelerator on one CPU process and a
one-rank gloo process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


class CpuAccelerator:
    """What the engines use of accelerate's Accelerator, for one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    native_amp = False

    def prepare(self, model, optimizer):
        return model, optimizer

    def prepare_optimizer(self, optimizer, device_placement=None):
        return optimizer

    def unscale_gradients(self):
        pass

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


@pytest.fixture
def one_rank():
    """A one-rank gloo process group for the test, removed after it."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()
