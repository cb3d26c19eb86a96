"""Which weights produced a result: a cheap fingerprint of a model's parameters, recorded in caches and checked on
reuse, so that results of other weights (another seed, an orthogonalized or fine-tuned copy under the same name)
are never taken for this model's."""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 64  # elements read from each parameter, along its first row and its first column


def _sample(param: torch.Tensor) -> torch.Tensor:
    """A few elements of a parameter (views only, then copied to the CPU): the start of its first row and first
    column, so an edit of any output or input direction of a matrix shows up."""
    t = param.detach()
    while t.dim() > 2:
        t = t[0]
    parts = [t.reshape(-1)[:SAMPLE]] if t.dim() < 2 else [t[0, :SAMPLE], t[:SAMPLE, 0]]
    return torch.cat([p.to("cpu", torch.float32) for p in parts])


def weights_fingerprint(model) -> str:
    """A short hash of every parameter's name, shape and a fixed handful of its values, rounded to bfloat16 so the
    same checkpoint loaded in float32, bfloat16 or float16 gives the same fingerprint (a ``ModelHandle`` or a
    ``torch.nn.Module``). Milliseconds even on an 8B model: about 128 values per tensor leave the device.
    Offloaded (meta) parameters contribute only their name and shape."""
    module = getattr(model, "hf_model", model)
    h = hashlib.sha256()
    for name, param in module.named_parameters():
        h.update(f"{name}{tuple(param.shape)};".encode())
        if param.device.type != "meta":
            h.update(_sample(param).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
