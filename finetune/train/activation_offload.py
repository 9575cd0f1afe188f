"""`trainer.activation_offload=true`: the activations a forward saves for its backward wait in
pinned host memory instead of the GPU's.

`ActivationOffload` is a pair of autograd saved-tensor hooks
(`torch.autograd.graph.saved_tensors_hooks`), the mechanism torchtune's OffloadActivations
uses (pytorch/torchtune, torchtune/training/_activation_offloading.py). In the forward, each
saved tensor of at least `min_bytes` that is not a weight is copied to pinned host memory on a
side stream, so the copy overlaps the compute that follows; the GPU tensor is kept only until
its copy is done, and at most `max_stash` of them at a time. In the backward, a tensor whose
GPU copy still exists (the last ones saved) is used as is; the others are copied back on the
side stream and the compute stream waits for them. Losses and gradients are unchanged; the
price is the host-device traffic, which costs little where the copy hides behind the compute
(large layers) and most on small models.

The streams, events and copies go through `Transfers`, so the hooks' bookkeeping runs and is
tested on a CPU with a simulated device (tests/unit/train/test_activation_offload.py).
`check_activation_offload` refuses the setting where it cannot help: on a CPU (activations
already live in host memory) and on Apple GPUs (one memory shared with the host).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import torch

from finetune.errors import ConfigError
from finetune.hardware.profile import HardwareProfile

MIN_BYTES = 64 * 2**10  # smaller tensors are not worth a transfer
MAX_STASH = 4  # saved GPU tensors kept alive while their host copies complete

_REFUSED = {
    "cpu": ("this run trains on the CPU, where activations already live in host memory: there "
            "is nothing to move"),
    "apple": ("Apple GPUs share one memory with the host, so moving activations there frees "
              "nothing"),
    "intel": ("the offload runs on CUDA/HIP streams and pinned memory, not yet on Intel XPUs"),
}
_FIX = ("Set trainer.activation_offload=false; to lower activation memory use "
        "trainer.gradient_checkpointing=true")


def offload_refusal(profile: HardwareProfile) -> str | None:
    """Why `trainer.activation_offload=true` cannot run on `profile` (None: it can: NVIDIA or AMD
    GPUs, through torch.cuda)."""
    return _REFUSED.get(profile.vendor)


def check_activation_offload(enabled: bool, profile: HardwareProfile) -> None:
    """Raise ConfigError when trainer.activation_offload=true is set where it cannot run."""
    why = None if not enabled else offload_refusal(profile)
    if why is not None:
        raise ConfigError(f"trainer.activation_offload=true: {why} ({profile.name}). {_FIX}.")


class Transfers(Protocol):
    """The device operations the hooks need; `CudaTransfers` on a GPU, a fake in tests."""

    device_type: str

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying `tensor` to pinned host memory on the side stream, after the work
        queued so far on the compute stream; return (host tensor, event marking the copy)."""

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (the GPU tensor may then be freed)."""

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy `host` back to the device on the side stream; the compute stream waits for it."""


class CudaTransfers:
    """`Transfers` on torch.cuda (NVIDIA, and AMD through HIP): one side stream for both
    directions, pinned host buffers."""

    device_type = "cuda"

    def __init__(self) -> None:
        self.side = torch.cuda.Stream()

    def to_host(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            return host, self.side.record_event()

    def wait(self, event: Any) -> None:
        torch.cuda.current_stream().wait_event(event)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        compute = torch.cuda.current_stream()
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            tensor = host.to("cuda", non_blocking=True)
        compute.wait_stream(self.side)
        # Allocated on the side stream, used on the compute one: the caching allocator must
        # not hand its memory out again before the compute stream is done with it.
        tensor.record_stream(compute)
        return tensor


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large activations in host memory between the forward and
    the backward (see the module docstring). Use as a context manager around the forward;
    the backward may run outside it.

    `offloaded` counts the tensors copied to the host, `kept` the ones left on the device
    (weights, small tensors, other devices) since construction."""

    def __init__(self, transfers: Transfers, *, min_bytes: int = MIN_BYTES,
                 max_stash: int = MAX_STASH) -> None:
        self.transfers, self.min_bytes, self.max_stash = transfers, min_bytes, max_stash
        # handle -> (device tensor, event): offloaded tensors whose device copy still exists
        self.stash: OrderedDict[int, tuple[torch.Tensor, Any]] = OrderedDict()
        self.next_handle = 0
        self.offloaded = self.kept = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffload:
        # A forward whose graph was dropped without a backward leaves its last tensors here.
        self.release()
        super().__enter__()
        return self

    def release(self) -> None:
        """Drop every stashed device tensor, once its host copy is done."""
        while self.stash:
            self._drop_oldest()

    def _eligible(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != self.transfers.device_type:
            return False
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return False  # a weight (or a view of one) stays where it lives anyway
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def _drop_oldest(self) -> None:
        _, (_, event) = self.stash.popitem(last=False)
        self.transfers.wait(event)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self._eligible(tensor):
            self.kept += 1
            return tensor
        while len(self.stash) >= self.max_stash:
            self._drop_oldest()
        host, event = self.transfers.to_host(tensor)
        handle = self.next_handle
        self.next_handle += 1
        self.stash[handle] = (tensor, event)
        self.offloaded += 1
        return handle, host

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        handle, host = packed
        stashed = self.stash.pop(handle, None)
        if stashed is not None:  # still on the device: no round trip
            return stashed[0]
        return self.transfers.to_device(host)


def with_activation_offload(loss_fn: Callable[..., Any], hooks: ActivationOffload
                            ) -> Callable[..., Any]:
    """`loss_fn` with its forward run under `hooks` (the backward that follows unpacks)."""

    @functools.wraps(loss_fn)
    def offloaded(*args: Any, **kwargs: Any) -> Any:
        with hooks:
            return loss_fn(*args, **kwargs)

    return offloaded
