"""Direct attribution of a direction to attention heads and MLP blocks, and attention patterns per head.

Both read one prompt through the bridge's own hook points (``attn.hook_z``, ``attn.o.hook_out``,
``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_pre/post``, ``attn.hook_pattern``) and return tensors; plots
live elsewhere (:mod:`steering.suffix_plots`). Each head's slice of the attention output projection comes from
:func:`probes.architecture.attention_head_outputs`, so no module here names a Hugging Face layer.

Decomposition of the residual stream after block ``L`` along a unit direction r̂ (every term float64)::

    resid_post[L] . r̂ = embed + sum_{l <= L} (sum_h head[l, h] + attn_bias[l] + mlp[l])

- ``embed``: the stream entering block 0 (token and position embeddings, with any scaling the model applies);
- ``head[l, h] = s * (z_h W_O[h]) . (g * r̂)``: what head h adds through the output projection;
- ``attn_bias[l]``: the output projection's bias (through the same ``s * g``) plus any post-norm's own bias;
- ``mlp[l]``: the whole MLP or mixture-of-experts output (``hook_mlp_out``, its biases included).

Pre-norm and parallel blocks have ``s = 1, g = 1``: the decomposition is exact and zero-ablating head h changes the
projection at its block's output by exactly ``-head[l, h]``. Where a post-norm sits between the heads and the stream
(Gemma-2/3, OLMo-2: ``g * u / rms(u)``), the attribution is linearised through the norm at that token: ``g`` is
its gain and ``s = 1 / rms(u)`` its scale there (read from the hooks as the least-squares factor between ``g * u``
and the norm's output, exact for an RMSNorm). The sum is still exact; an ablation is not, because removing a head
changes ``rms(u)``: it changes the projection by ``(norm(u - u_h) - norm(u)) . r̂`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from probes.architecture import Writer, attention_head_outputs
from probes.models import ModelHandle


@dataclass
class Attribution:
    """What each writer of the residual stream adds along r̂, up to the output of block ``layer``, at ``positions``
    of one prompt: ``heads`` [layer + 1, n_heads, P], ``attn_bias`` and ``mlp`` [layer + 1, P], ``embed`` and
    ``total`` (the measured ``resid_post[layer] . r̂``) [P]; float64 on the CPU."""

    layer: int
    positions: list[int]
    embed: torch.Tensor
    heads: torch.Tensor
    attn_bias: torch.Tensor
    mlp: torch.Tensor
    total: torch.Tensor

    def summed(self) -> torch.Tensor:
        """The sum of every term: equals ``total`` up to rounding [P]."""
        return self.embed + self.heads.sum((0, 1)) + self.attn_bias.sum(0) + self.mlp.sum(0)

    def top_heads(self, k: int, position: int = -1) -> list[tuple[int, int, float]]:
        """The ``k`` heads adding most along r̂ at ``positions[position]``: (layer, head, attribution), largest
        first."""
        return top_heads(self.heads[..., position], k)


def top_heads(values: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest entries of a per-head table ``values`` [layers, heads]: (layer, head, value), largest
    first."""
    flat = values.flatten()
    return [(int(i) // values.shape[1], int(i) % values.shape[1], float(flat[i]))
            for i in flat.argsort(descending=True)[:k]]


def _capture(model: ModelHandle, ids: Sequence[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The bridge's hook points ``names`` on one prompt (no padding), first batch row, on the CPU."""
    seen: dict[str, torch.Tensor] = {}

    def make(name: str):
        def record(tensor, hook):
            seen[name] = tensor.detach()[0].cpu()
            return tensor
        return record
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(name, make(name)) for name in names]):
        model.bridge(torch.tensor([list(ids)], device=model.device))
    missing = sorted(set(names) - set(seen))
    if missing:
        raise RuntimeError(f"{model.name}: the bridge's hooks {missing} did not fire")
    return seen


def attn_writer(model: ModelHandle, layer: int) -> Writer:
    """The attention writer of block ``layer`` (its post-norm, if any, is the module that writes)."""
    return next(w for w in model.architecture.writers if w.kind == "attn" and w.layer == layer)


def _norm_terms(writer: Writer, u: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gain [d], scale [T], post-norm bias [d]) of the writer at each token: ones and zeros without a post-norm."""
    d = u.shape[-1]
    if writer.post_norm is None:
        return torch.ones(d, dtype=u.dtype), torch.ones(u.shape[0], dtype=u.dtype), torch.zeros(d, dtype=u.dtype)
    gain = writer.post_norm.gain()
    gain = torch.ones(d, dtype=u.dtype) if gain is None else gain.cpu().double()
    bias = next((w.param.detach().cpu().double() for w in writer.weights if w.after_norm), torch.zeros(d).double())
    scaled = u * gain
    scale = ((out - bias) * scaled).sum(-1) / (scaled * scaled).sum(-1).clamp_min(1e-300)
    return gain, scale, bias


def _layer_terms(model: ModelHandle, cap: dict, layer: int, r: torch.Tensor, pos: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heads [H, P], attention bias [P], MLP [P]) of block ``layer`` along unit ``r``."""
    z = cap[f"blocks.{layer}.attn.hook_z"].double()[pos]  # [P, H, d_head]
    weight, bias = attention_head_outputs(model.bridge, model.hf_model, layer)
    gain, scale, norm_bias = _norm_terms(attn_writer(model, layer), cap[f"blocks.{layer}.attn.o.hook_out"].double(),
                                         cap[f"blocks.{layer}.hook_attn_out"].double())
    read = weight.cpu().double() @ (gain * r)  # [H, d_head]
    heads = scale[pos, None] * torch.einsum("phd,hd->ph", z.reshape(len(pos), *read.shape), read)
    o_bias = 0.0 if bias is None else float(bias.cpu().double() @ (gain * r))
    attn_bias = scale[pos] * o_bias + float(norm_bias @ r)
    return heads.T, attn_bias, cap[f"blocks.{layer}.hook_mlp_out"].double()[pos] @ r


def attribute(model: ModelHandle, ids: Sequence[int], direction: torch.Tensor, layer: int | None = None,
              positions: Sequence[int] = (-1,)) -> Attribution:
    """Decompose ``resid_post[layer] . r̂`` of one prompt (token ids, no padding) at ``positions`` (negative:
    from the end) into the embedding, every head, every attention bias and every MLP of blocks 0..``layer``
    (default: the last block); see the module docstring for the post-norm case."""
    layer = model.n_layers - 1 if layer is None else layer
    r = direction.detach().cpu().double()
    r = r / r.norm()
    pos = [p % len(ids) for p in positions]
    names = ["blocks.0.hook_resid_pre", f"blocks.{layer}.hook_resid_post"] + [
        f"blocks.{b}.{h}" for b in range(layer + 1)
        for h in ("attn.hook_z", "attn.o.hook_out", "hook_attn_out", "hook_mlp_out")]
    cap = _capture(model, ids, names)
    terms = [_layer_terms(model, cap, b, r, pos) for b in range(layer + 1)]
    return Attribution(layer, list(positions), cap["blocks.0.hook_resid_pre"].double()[pos] @ r,
                       torch.stack([t[0] for t in terms]), torch.stack([t[1] for t in terms]),
                       torch.stack([t[2] for t in terms]), cap[f"blocks.{layer}.hook_resid_post"].double()[pos] @ r)


def attention_patterns(model: ModelHandle, ids: Sequence[int], layers: Sequence[int] | None = None,
                       queries: Sequence[int] = (-1,)) -> torch.Tensor:
    """Attention of each head from the ``queries`` positions of one prompt to every token, from the bridge's
    ``attn.hook_pattern``: [len(layers), n_heads, len(queries), n_tokens] float32 (rows sum to 1)."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    cap = _capture(model, ids, [f"blocks.{b}.attn.hook_pattern" for b in layers])
    return torch.stack([cap[f"blocks.{b}.attn.hook_pattern"].float()[:, list(queries)] for b in layers])


def attention_mass(patterns: torch.Tensor, spans: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The attention each span of key tokens ``[start, stop)`` receives: by name, ``patterns`` summed over its keys
    (patterns as :func:`attention_patterns` returns them; the result drops the key axis)."""
    return {name: patterns[..., start:stop].sum(-1) for name, (start, stop) in spans.items()}
