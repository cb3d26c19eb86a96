"""Interventions on the residual stream as context managers: directional ablation and activation addition.

They hook ``model.hf_model`` (the plain Hugging Face module tree that generation and activation extraction use), so
they act during ``forward``, ``generate`` and :func:`probes.cache.extract` alike, and are removed on exit (also when
the body raises).

Both take one direction ``[d_model]`` for the whole batch, or one per batch row ``[batch, d_model]``: the latter lets
many candidate directions be evaluated in a single forward pass (see :func:`steering.refusal.score_candidates`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch

from probes.cache import decoder_layers
from probes.models import ModelHandle


def _check_width(model: ModelHandle, direction: torch.Tensor) -> torch.Tensor:
    direction = torch.as_tensor(direction)
    if direction.dim() not in (1, 2) or direction.shape[-1] != model.d_model:
        raise ValueError(f"direction must have shape [d_model] or [batch, d_model] with d_model={model.d_model}, "
                         f"got shape {tuple(direction.shape)}")
    return direction


def unit_direction(model: ModelHandle, direction: torch.Tensor) -> torch.Tensor:
    """The direction(s) scaled to unit norm, on the model's device and dtype; refuses a wrong width or a zero vector."""
    direction = _check_width(model, direction).double()
    norm = direction.norm(dim=-1, keepdim=True)
    if not torch.isfinite(norm).all() or (norm == 0).any():
        raise ValueError("direction has zero or non-finite norm")
    return (direction / norm).to(device=model.device, dtype=model.dtype)


def _per_row(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``r`` shaped to broadcast over ``x`` [batch, seq, d]: [d] stays, [batch, d] becomes [batch, 1, d]."""
    if r.dim() == 1:
        return r
    if r.shape[0] != x.shape[0]:
        raise ValueError(f"{r.shape[0]} per-row directions for a batch of {x.shape[0]} rows")
    return r.unsqueeze(1)


def project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x - (x . r) r for unit ``r`` ([d], or [batch, d] with one direction per row of ``x`` [batch, seq, d])."""
    if r.dim() == 1:
        return x - (x @ r).unsqueeze(-1) * r
    r = _per_row(r, x)
    return x - (x @ r.transpose(1, 2)) * r


def residual_writers(model: ModelHandle) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream: the embedding, each attention and each MLP."""
    writers: list[torch.nn.Module] = [model.hf_model.get_input_embeddings()]
    for layer in decoder_layers(model.hf_model):
        writers += [layer.self_attn, layer.mlp]
    return writers


@contextlib.contextmanager
def ablate(model: ModelHandle, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every write to the residual stream, at all layers and positions.

    With the embedding, every attention output and every MLP output orthogonal to ``r``, the residual stream is
    orthogonal to ``r`` everywhere: x' = x - (x . r) r at every layer and position (Arditi et al., 2024).
    """
    r = unit_direction(model, direction)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (project_out(output[0], r), *output[1:])
        return project_out(output, r)

    with contextlib.ExitStack() as stack:
        for module in residual_writers(model):
            stack.callback(module.register_forward_hook(hook).remove)
        yield


@contextlib.contextmanager
def add(model: ModelHandle, direction: torch.Tensor, layer: int | Sequence[int], coeff: float = 1.0
        ) -> Iterator[None]:
    """Add ``coeff * direction`` (not normalised) to the residual stream entering block ``layer``, at all positions.

    With per-row directions ``[batch, d]``, ``layer`` may also give one layer per row.
    """
    direction = _check_width(model, direction)
    layers = [layer] if isinstance(layer, int) else list(layer)
    if direction.dim() == 1 and len(layers) != 1:
        raise ValueError("one direction needs one layer; pass [batch, d_model] directions for one layer per row")
    if direction.dim() == 2 and len(layers) not in (1, direction.shape[0]):
        raise ValueError(f"{len(layers)} layers for {direction.shape[0]} per-row directions")
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1}, got {bad}")
    vectors = (direction.double() * coeff).to(device=model.device, dtype=model.dtype)
    if len(layers) == 1:
        per_layer = {layers[0]: vectors}
    else:
        rows = torch.tensor(layers, device=model.device)
        per_layer = {l: vectors * (rows == l).unsqueeze(1).to(vectors.dtype) for l in sorted(set(layers))}

    with replace_block_inputs(model, {l: (lambda h, v=v: h + _per_row(v, h)) for l, v in per_layer.items()}):
        yield


@contextlib.contextmanager
def replace_block_inputs(model: ModelHandle, edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]
                         ) -> Iterator[None]:
    """Replace the residual stream entering decoder block ``layer`` by ``edits[layer](hidden)`` ([batch, seq, d]) in
    every forward pass (also each step of ``generate``), for the duration; the hooks are removed on exit."""
    blocks = decoder_layers(model.hf_model)
    bad = [layer for layer in edits if not 0 <= layer < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} outside 0..{len(blocks) - 1}")

    def make(edit):
        def hook(module, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        return hook

    with contextlib.ExitStack() as stack:
        for layer, edit in edits.items():
            stack.callback(blocks[layer].register_forward_pre_hook(make(edit), with_kwargs=True).remove)
        yield
