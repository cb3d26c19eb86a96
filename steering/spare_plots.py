"""Figures of the SpARE experiment (plotly), built from its results dict."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from probes.cache import RESIDUAL_HOOK
from probes.files import write_figure

METHODS = ("no_edit", "actadd", "spare")


def residual_index(hook_name: str) -> int:
    """Where a residual hook point sits on the probe curve, whose point i is the residual stream after i blocks:
    L for ``blocks.L.hook_resid_pre``, L + 1 for ``blocks.L.hook_resid_post``."""
    layer, kind = RESIDUAL_HOOK.match(hook_name).groups()
    return int(layer) + (kind == "post")


def probe_accuracy(results: dict) -> go.Figure:
    """Conflict-probe test accuracy by layer, with the SAEs' hook points marked."""
    fig = go.Figure(go.Scatter(x=results["layers"], y=results["conflict_probe_accuracy"], mode="lines+markers",
                               name="conflict probe"))
    for hook_name in results["sae_hooks"].values():
        fig.add_vline(x=residual_index(hook_name), line_dash="dot", line_color="grey")
    fig.update_layout(title=f"{results['model']}: does the context conflict with memory? (dotted: SAE hook points)",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="test accuracy", yaxis_range=[0.4, 1.02])
    return fig


def steering_bars(results: dict) -> go.Figure:
    """Exact match toward the context answer and toward the memorised answer, per method."""
    targets = ("steer_to_context", "steer_to_memory")
    fig = go.Figure([go.Bar(name=m, x=[t.replace("_", " ") for t in targets], y=[results[t][m] for t in targets])
                     for m in METHODS])
    fig.update_layout(barmode="group", title=f"{results['model']}: exact match on held-out conflict prompts",
                      yaxis_title="exact match", yaxis_range=[0, 1])
    return fig


def mi_ranking(results: dict, layer: int | str) -> go.Figure:
    """Mutual information of the selected latents of one layer, coloured by the behaviour they favour."""
    entry = results["latents"][layer] if layer in results["latents"] else results["latents"][str(layer)]
    ids = entry["context"] + entry["memory"]
    colour = ["context"] * len(entry["context"]) + ["memory"] * len(entry["memory"])
    order = sorted(range(len(ids)), key=lambda i: -entry["mi"][i])
    fig = go.Figure([go.Bar(x=[f"#{ids[i]}" for i in order if colour[i] == c],
                            y=[entry["mi"][i] for i in order if colour[i] == c], name=f"favours {c}")
                     for c in ("context", "memory")])
    fig.update_layout(title=f"layer {layer}: selected SAE latents by mutual information with the behaviour",
                      xaxis_title="latent", yaxis_title="MI (nats)", xaxis={"categoryorder": "total descending"})
    return fig


# The files write_all writes (a run folder's figures, replaced as a whole by the next run).
FIGURE_FILES = ("probe_accuracy.html", "steering.html", "latents_layer*.html")


def write_all(results: dict, out: Path) -> None:
    """Every figure as HTML in ``out`` (plotly.js once, beside them), each file atomically."""
    figures = {"probe_accuracy": probe_accuracy(results), "steering": steering_bars(results)}
    figures.update({f"latents_layer{l}": mi_ranking(results, l) for l in results["spare_layers"]})
    for name, fig in figures.items():
        write_figure(fig, out / f"{name}.html")
