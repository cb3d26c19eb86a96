"""The heatmap of an activation-patching result (:class:`steering.patching.PatchingResult`)."""

from __future__ import annotations

import os

import plotly.graph_objects as go

from probes.files import write_figure
from steering.patching import PatchingResult


def position_labels(result: PatchingResult) -> list[str]:
    """One label per patched position, unique (plotly merges equal category labels): the position and the corrupted
    token, then the clean one where they differ (``∅``: no aligned clean token)."""
    labels = []
    for p, corrupted, clean in zip(result.positions, result.tokens, result.clean_tokens, strict=True):
        shown = repr(corrupted) if clean == corrupted else f"{corrupted!r}→{'∅' if clean is None else repr(clean)}"
        labels.append(f"{p} {shown}")
    return labels


def patching_figure(result: PatchingResult, normalized: bool = True, title: str | None = None,
                    path: str | os.PathLike | None = None) -> go.Figure:
    """Heatmap of ``result``: tokens on x and layers on y ([layers, positions]); heads on x for [layers, heads];
    one row per layer and head for [layers, heads, positions]. ``normalized``: 1 = clean restored, 0 = no effect
    (else the raw metric). Written as HTML (with plotly.js beside it) only when ``path`` is given."""
    values = result.normalized() if normalized else result.values
    layers = [f"L{b}" for b in result.layers]
    if result.dims == ("layer", "head"):
        x, y, z = [f"H{h}" for h in result.heads], layers, values
    elif result.dims == ("layer", "head", "position"):
        x, y = position_labels(result), [f"L{b} H{h}" for b in result.layers for h in result.heads]
        z = values.reshape(len(y), len(x))
    else:
        x, y, z = position_labels(result), layers, values
    metric = "normalized metric" if normalized else "metric"
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=y, colorscale="RdBu", zmid=0, colorbar=dict(title=metric),
                               hovertemplate="%{y}, %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(
        title=title or (f"Activation patching ({result.kind}): clean {result.clean_metric:.3f}, "
                        f"corrupted {result.corrupted_metric:.3f}"),
        xaxis_title="head" if result.dims == ("layer", "head") else "position and token (corrupted→clean)",
        yaxis_title="layer", yaxis_autorange="reversed", height=max(320, 22 * len(y) + 160))
    if path is not None:
        write_figure(fig, path)
    return fig
