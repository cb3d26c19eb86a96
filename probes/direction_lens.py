"""What a direction in the residual stream means: the tokens it promotes and suppresses (its logit lens) and where
it is carried (its projection on every token of some prompts, layer by layer).

Any direction of width d_model works: a refusal direction, a probe's weights, an SAE decoder row. The logit lens
reads the direction through the model's own final norm and unembedding (:func:`probes.architecture.
final_norm_and_unembedding`), so norm gains count as they do for a real residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from probes.architecture import final_norm_and_unembedding
from probes.cache import extract, residual_hooks
from probes.devices import execution_device
from probes.errors import WorkbenchError, as_list
from probes.forward import text_token_ids
from probes.models import ModelHandle


def check_directions(model: ModelHandle, directions: torch.Tensor) -> torch.Tensor:
    """``directions`` ([d_model] or [n, d_model]) as a float32 [n, d_model] tensor, refused in one line if its width
    is not the model's d_model or a direction is zero or not finite (checked before any forward pass)."""
    d = torch.as_tensor(directions).detach()
    if d.dim() not in (1, 2) or d.shape[-1] != model.d_model:
        width = d.shape[-1] if d.dim() else "none (a scalar)"
        raise WorkbenchError(f"the direction has width {width} (shape {tuple(d.shape)}), but model {model.name!r} "
                             f"has d_model={model.d_model}: give a vector of {model.d_model} values, or [n, "
                             f"{model.d_model}] for n directions")
    d = d.reshape(-1, model.d_model).float()
    if not torch.isfinite(d).all() or (d.norm(dim=-1) == 0).any():
        raise WorkbenchError("a direction is zero or holds NaN/infinite values: it points nowhere")
    return d


def token_strings(model: ModelHandle, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (a leading space kept, a newline shown as ↵), for labels."""
    return [t.replace("\n", "↵") for t in model.tokenizer.batch_decode([[int(i)] for i in ids])]


@torch.inference_mode()
def direction_logits(model: ModelHandle, directions: torch.Tensor) -> torch.Tensor:
    """The logit lens of each direction: [n, vocab] float32 on the CPU ([vocab] for one direction).

    The logits of a final residual stream pointing exactly along the direction (scaled to unit RMS, then through
    the final norm and the unembedding), less those of a zero residual (norm and unembedding biases): for an RMSNorm
    model ``W_U @ (gain * d) / rms(d)``, the usual ``W_dec[i] @ W_U`` with the final norm's gain folded in."""
    single = torch.as_tensor(directions).dim() == 1
    d = check_directions(model, directions)
    norm, unembed = final_norm_and_unembedding(model.bridge, model.hf_model)
    x = d / d.pow(2).mean(-1, keepdim=True).sqrt()
    x = torch.cat([x, torch.zeros_like(x[:1])]).to(execution_device(norm), model.dtype)
    logits = unembed(norm(x).to(execution_device(unembed))).float().cpu()
    out = logits[:-1] - logits[-1:]
    return out[0] if single else out


@dataclass
class LogitLens:
    """The tokens a direction promotes and suppresses most, with their logit (see :func:`direction_logits`)."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    promoted_ids: list[int]
    suppressed_ids: list[int]


def lens_of_logits(model: ModelHandle, logits: torch.Tensor, k: int = 10) -> LogitLens:
    """The ``k`` highest and lowest entries of one direction's logits ([vocab]) as tokens."""
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    up, down = top.indices.tolist(), bottom.indices.tolist()
    return LogitLens(list(zip(token_strings(model, up), top.values.tolist(), strict=True)),
                     list(zip(token_strings(model, down), bottom.values.tolist(), strict=True)), up, down)


def logit_lens(model: ModelHandle, direction: torch.Tensor, k: int = 10) -> LogitLens:
    """The ``k`` tokens a direction [d_model] promotes and the ``k`` it suppresses most (:func:`direction_logits`)."""
    if torch.as_tensor(direction).dim() != 1:
        raise WorkbenchError(f"logit_lens takes one direction [d_model={model.d_model}], got shape "
                             f"{tuple(torch.as_tensor(direction).shape)}; use direction_logits for several")
    return lens_of_logits(model, direction_logits(model, direction), k)


def lens_rows(lens: LogitLens) -> tuple[list[str], list[float]]:
    """Labels (token and id, unique) and logits from the most promoted token down to the most suppressed."""
    ids = lens.promoted_ids + lens.suppressed_ids[::-1]
    rows = lens.promoted + lens.suppressed[::-1]
    return [f"{t!r} #{i}" for (t, _), i in zip(rows, ids, strict=True)], [v for _, v in rows]


def logit_lens_figure(lens: LogitLens, title: str = "Logit lens of the direction") -> go.Figure:
    """Horizontal bars: the promoted tokens (positive logits) above the suppressed ones (negative)."""
    labels, values = lens_rows(lens)
    fig = go.Figure(go.Bar(x=values, y=labels, orientation="h",
                           marker_color=["#2a7" if v > 0 else "#c33" for v in values]))
    fig.update_layout(title=title, xaxis_title="logit (final residual along the direction, unit RMS)",
                      height=max(300, 22 * len(labels) + 120), yaxis={"autorange": "reversed"})
    return fig


@dataclass
class Projections:
    """A direction's projection on every token of each prompt: ``values[p]`` is [n_layers, n_tokens] for prompt
    ``p``; row j is residual point ``layers[j]`` (the stream after that many blocks, 0: the embeddings)."""

    prompts: list[str]
    tokens: list[list[str]]
    layers: list[int]
    values: list[torch.Tensor]


def direction_projections(model: ModelHandle, direction: torch.Tensor, prompts: Sequence[str],
                          layers: Sequence[int] | None = None, progress: bool = True) -> Projections:
    """The residual stream's projection on the unit ``direction`` at every token of ``prompts`` (tokenized with the
    tokenizer's special tokens) at residual points ``layers`` (default: all, 0..n_layers), read by
    :func:`probes.cache.extract` (positions="all")."""
    if torch.as_tensor(direction).dim() != 1:
        raise WorkbenchError(f"give one direction [d_model={model.d_model}], got shape "
                             f"{tuple(torch.as_tensor(direction).shape)}")
    unit = check_directions(model, direction)[0]
    unit = unit / unit.norm()
    prompts = as_list(prompts, "prompts")
    points = list(range(model.n_layers + 1)) if layers is None else list(layers)
    ids = text_token_ids(model, prompts)
    cache = extract(model, ids, residual_hooks(model, points), positions="all", progress=progress)
    flat = (cache.acts.float() @ unit.to(cache.acts.device)).cpu()  # [n_tokens, n_layers]
    values = [part.T.contiguous() for part in flat.split(cache.meta["lengths"])]
    return Projections(prompts, [token_strings(model, p) for p in ids], points, values)


def _colour_limit(proj: Projections) -> float:
    """Largest |projection| away from each prompt's first token (an attention sink whose norm dwarfs the rest)."""
    rest = [v[:, 1:] for v in proj.values if v.shape[1] > 1]
    pool = torch.cat([v.reshape(-1) for v in rest]) if rest else torch.cat([v.reshape(-1) for v in proj.values])
    return float(pool.abs().max()) or 1.0


def projection_heatmap(proj: Projections, title: str = "Projection on the direction by layer and token"
                       ) -> go.Figure:
    """One heatmap per prompt (layers by tokens), on one diverging colour scale centred on zero; the scale is set
    by the tokens after each prompt's first (whose value shows on hover even when it saturates)."""
    n = len(proj.values)
    height = 120 + 360 * n  # pixels; 150 of them between plots leave room for the rotated token labels
    titles = [" ".join(p.split()) for p in proj.prompts]  # a chat prompt's end is the instruction: keep the end
    fig = make_subplots(rows=n, cols=1, vertical_spacing=min(150 / height, 0.9 / max(n - 1, 1)),
                        subplot_titles=[t if len(t) <= 90 else "..." + t[-87:] for t in titles])
    for row, (tokens, values) in enumerate(zip(proj.tokens, proj.values, strict=True), start=1):
        x = list(range(len(tokens)))
        hover = [[f"layer {layer}<br>{i}: {tok!r}<br>{v:.3g}" for i, (tok, v) in enumerate(zip(tokens, line,
                                                                                            strict=True))]
                 for layer, line in zip(proj.layers, values.tolist(), strict=True)]
        fig.add_trace(go.Heatmap(z=values.numpy(), x=x, y=proj.layers, coloraxis="coloraxis", text=hover,
                                 hoverinfo="text"), row, 1)
        fig.update_xaxes(tickvals=x, ticktext=tokens, tickangle=-60, row=row, col=1)
        fig.update_yaxes(title_text="layer", row=row, col=1)
    limit = _colour_limit(proj)
    fig.update_layout(title=title, height=height,
                      coloraxis={"colorscale": "RdBu", "cmin": -limit, "cmax": limit,
                                 "colorbar": {"title": "projection"}})
    return fig
