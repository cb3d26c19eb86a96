"""Interventions on the residual stream as context managers: directional ablation and activation addition.

They hook ``model.hf_model`` (the plain Hugging Face module tree that generation and activation extraction use), so
they act during ``forward``, ``generate`` and :func:`probes.cache.extract` alike, and are removed on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from probes.cache import decoder_layers
from probes.models import ModelHandle


def unit_direction(model: ModelHandle, direction: torch.Tensor) -> torch.Tensor:
    """The direction as a unit vector on the model's device and dtype; refuses a wrong width or a zero vector."""
    direction = torch.as_tensor(direction)
    if direction.dim() != 1 or direction.shape[0] != model.d_model:
        raise ValueError(f"direction must be a vector of width d_model={model.d_model}, got shape "
                         f"{tuple(direction.shape)}")
    norm = direction.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction has zero or non-finite norm")
    return (direction.double() / norm).to(device=model.device, dtype=model.dtype)


def _project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x - (x @ r).unsqueeze(-1) * r


def residual_writers(model: ModelHandle) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream: the embedding, each attention and each MLP."""
    base = model.hf_model.get_decoder() if hasattr(model.hf_model, "get_decoder") else model.hf_model
    writers = [base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else base.embed_tokens]
    for layer in decoder_layers(model.hf_model):
        writers += [layer.self_attn, layer.mlp]
    return writers


@contextlib.contextmanager
def ablate(model: ModelHandle, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every write to the residual stream, at all layers and positions."""
    r = unit_direction(model, direction)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_project_out(output[0], r), *output[1:])
        return _project_out(output, r)

    with contextlib.ExitStack() as stack:
        for module in residual_writers(model):
            stack.callback(module.register_forward_hook(hook).remove)
        yield


@contextlib.contextmanager
def add(model: ModelHandle, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * direction`` (not normalised) to the residual stream entering block ``layer``, at all positions."""
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1}, got {layer}")
    unit_direction(model, direction)  # validates the width
    vector = (torch.as_tensor(direction).double() * coeff).to(device=model.device, dtype=model.dtype)

    def hook(module, args, kwargs):
        if args:
            return (args[0] + vector, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}

    handle = decoder_layers(model.hf_model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
