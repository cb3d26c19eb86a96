"""Interventions on the residual stream as context managers: directional ablation and activation addition.

They hook ``model.hf_model`` (the plain Hugging Face module tree that generation and activation extraction use), so
they act during ``forward``, ``generate`` and :func:`probes.cache.extract` alike, and are removed on exit (also when
the body raises).

Both take one direction ``[d_model]`` for the whole batch, or one per batch row ``[batch, d_model]``: the latter lets
many candidate directions be evaluated in a single forward pass (see :func:`steering.refusal.score_candidates`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping, Sequence

import torch

from probes.architecture import map_output, on_residual
from probes.cache import RESIDUAL_HOOK
from probes.devices import follow
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
    # a multiply-and-sum, not a batched matmul with one output column, which is slow on GPUs
    return x - (x * r).sum(-1, keepdim=True) * r


def residual_writers(model: ModelHandle) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream: the token (and position) embedding, each
    attention and each MLP or MoE block, after its post-norm where there is one (``model.architecture``)."""
    return [w.module for w in model.architecture.writers]


@contextlib.contextmanager
def ablate(model: ModelHandle, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every write to the residual stream, at all layers and positions.

    With the embeddings, every attention output and every MLP output (as added, after any post-norm) orthogonal to
    ``r``, the residual stream is orthogonal to ``r`` everywhere: x' = x - (x . r) r at every layer and position
    (Arditi et al., 2024), on pre-norm, post-norm, parallel and MoE blocks alike.
    """
    r = follow(unit_direction(model, direction))  # on each writer's device when the model is spread

    def hook(module, args, output):
        return map_output(output, lambda x: project_out(x, r(x)))

    with contextlib.ExitStack() as stack:
        for module in residual_writers(model):
            stack.callback(module.register_forward_hook(hook).remove)
        yield


def _adding(vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> h + vector`` (one vector per row where ``vector`` has rows); ``follow``: the vector on each block's
    device when the model is spread over devices."""
    on_device = follow(vector)
    return lambda h: h + _per_row(on_device(h), h)


@contextlib.contextmanager
def add(model: ModelHandle, direction: torch.Tensor, layer: int | Sequence[int], coeff: float = 1.0
        ) -> Iterator[None]:
    """Add ``coeff * direction`` (not normalised) to the residual stream entering block ``layer``, at all positions.

    With per-row directions ``[batch, d]``, ``layer`` may also give one layer per row. A NaN or infinite direction
    or coefficient is refused (it would turn every logit into NaN).
    """
    direction = _check_width(model, direction)
    if not torch.isfinite(direction).all():
        raise ValueError("direction has NaN or infinite entries; check how it was computed")
    if not math.isfinite(float(coeff)):
        raise ValueError(f"coeff must be a finite number, got {coeff}")
    layers = [layer] if isinstance(layer, int) else list(layer)
    if direction.dim() == 1 and len(layers) != 1:
        raise ValueError("one direction needs one layer; pass [batch, d_model] directions for one layer per row")
    if direction.dim() == 2 and len(layers) not in (1, direction.shape[0]):
        raise ValueError(f"{len(layers)} layers for {direction.shape[0]} per-row directions")
    bad = [block for block in layers if not 0 <= block < model.n_layers]
    if bad:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1}, got {bad}")
    vectors = (direction.double() * coeff).to(device=model.device, dtype=model.dtype)
    if len(layers) == 1:
        per_layer = {layers[0]: vectors}
    else:
        rows = torch.tensor(layers, device=model.device)
        per_layer = {block: vectors * (rows == block).unsqueeze(1).to(vectors.dtype) for block in sorted(set(layers))}

    with replace_block_inputs(model, {block: _adding(v) for block, v in per_layer.items()}):
        yield


@contextlib.contextmanager
def replace_block_inputs(model: ModelHandle, edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]
                         ) -> Iterator[None]:
    """Replace the residual stream entering decoder block ``layer`` by ``edits[layer](hidden)`` ([batch, seq, d]) in
    every forward pass (also each step of ``generate``), for the duration; the hooks are removed on exit."""
    with replace_residual(model, {f"blocks.{layer}.hook_resid_pre": edit for layer, edit in edits.items()}):
        yield


def residual_point(model: ModelHandle, hook_name: str) -> tuple[int, str]:
    """(block, "pre" or "post") of a residual-stream hook name; a clear error for any other hook point."""
    match = RESIDUAL_HOOK.match(hook_name) if isinstance(hook_name, str) else None
    if match is None:
        raise ValueError(f"cannot edit the residual stream at {hook_name!r}: the workbench places edits (and SAEs) at "
                         "'blocks.<L>.hook_resid_pre' or 'blocks.<L>.hook_resid_post'")
    layer = int(match.group(1))
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"{hook_name}: layer {layer} outside 0..{model.n_layers - 1}")
    return layer, match.group(2)


@contextlib.contextmanager
def replace_residual(model: ModelHandle, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
                     ) -> Iterator[None]:
    """Replace the residual stream at each hook point ``blocks.<L>.hook_resid_pre`` (entering block L) or
    ``blocks.<L>.hook_resid_post`` (leaving it) by ``edit(hidden)`` ([batch, seq, d]) in every forward pass (also
    each step of ``generate``), for the duration; the hooks are removed on exit."""
    blocks = model.architecture.blocks
    points = {name: residual_point(model, name) for name in edits}
    with contextlib.ExitStack() as stack:
        for name, edit in edits.items():
            layer, kind = points[name]
            stack.callback(on_residual(blocks[layer], kind, edit).remove)
        yield
