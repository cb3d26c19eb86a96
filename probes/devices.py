"""Models spread over devices by ``accelerate`` (``device_map``, offload), and out-of-memory recovery.

A dispatched model computes each module on its own *execution device*; an offloaded module keeps its weights on the
``meta`` device and accelerate's hook loads them onto the execution device for each forward pass. Inputs go to the
input embedding's execution device; an edit applied inside a hook follows the hidden state it receives
(:func:`follow`). A CUDA out-of-memory error during a batched loop halves the batch (:class:`Halving`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence, TypeVar

import torch

T = TypeVar("T")


class OutOfMemory(RuntimeError):
    """Even one item per batch does not fit in device memory; the message says what to try."""


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its parameters' device, or for weights offloaded by accelerate (on ``meta``), the
    device its hook loads them onto."""
    param = next(module.parameters(), None)
    if param is not None and param.device.type != "meta":
        return param.device
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        where = getattr(h, "execution_device", None)
        if where is not None:
            return torch.device(where)
    return torch.device("cpu") if param is None else param.device


def is_offloaded(model: torch.nn.Module) -> bool:
    """True when some weights live off the model (accelerate's CPU or disk offload: ``meta`` parameters)."""
    return any(p.device.type == "meta" for p in model.parameters())


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices a model computes on (execution devices of offloaded parts included), in first-use order."""
    found = dict.fromkeys(execution_device(m) for m in model.modules() if next(m.parameters(False), None) is not None)
    return list(found)


def follow(tensor: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> tensor`` on ``x``'s device, copied once per device: a direction or edit used inside hooks of a model
    spread over devices follows each module's hidden state without a copy per forward pass."""
    copies = {tensor.device: tensor}

    def on(x: torch.Tensor) -> torch.Tensor:
        if x.device not in copies:
            copies[x.device] = tensor.to(x.device)
        return copies[x.device]
    return on


def free_cuda_bytes(devices: Iterable[torch.device]) -> int | None:
    """The smallest free memory over the CUDA devices among ``devices`` (None when there are none)."""
    free = [torch.cuda.mem_get_info(d)[0] for d in set(devices) if d.type == "cuda"]
    return min(free) if free else None


class Halving:
    """Run batches that are cut in half after a device out-of-memory error and stay cut for the rest of the loop,
    telling the user once; one item that does not fit raises :class:`OutOfMemory`."""

    def __init__(self, what: str):
        self.what = what
        self.divisor = 1

    def run(self, batch: Sequence[T], fn: Callable[[list[T]], None]) -> None:
        """``fn`` on ``batch`` in pieces of ``ceil(len(batch) / divisor)`` items; the divisor doubles on OOM."""
        batch, start = list(batch), 0
        while start < len(batch):
            piece = batch[start:start + math.ceil(len(batch) / self.divisor)]
            try:
                fn(piece)
            except torch.OutOfMemoryError as err:
                self._shrink(len(batch), len(piece), err)
                continue
            start += len(piece)

    def _shrink(self, n: int, failed: int, err: Exception) -> None:
        if failed == 1:
            raise OutOfMemory(f"{self.what}: out of device memory with a batch of one ({err}). Spread the model "
                              "over more devices (--device-map auto, --max-memory), use a smaller dtype, or "
                              "shorter inputs.") from None
        first = self.divisor == 1
        while math.ceil(n / self.divisor) > math.ceil(failed / 2):
            self.divisor *= 2
        if first:
            warnings.warn(f"{self.what}: out of device memory at a batch of {failed}; halving the batch and going "
                          "on", stacklevel=3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
