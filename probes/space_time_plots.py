"""Plotly figures for the space and time probes; each takes the data that probes.space_time returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.files import write_figure

MAP_SCOPES = {"world_place": "world", "us_place": "usa", "nyc_place": "nyc"}


def r2_by_layer(results: dict, metric: str = "r2") -> go.Figure:
    """Test R² (or Spearman) per layer, one line per dataset."""
    fig = go.Figure()
    for name, entry in results["datasets"].items():
        fig.add_trace(go.Scatter(x=entry["layers"], y=entry[metric], mode="lines+markers", name=name))
    fig.update_layout(title=f"Probe {metric} on held-out entities by layer ({results['model']})",
                      xaxis_title="layer (residual stream after n blocks)", yaxis_title=metric, template="plotly_white")
    return fig


def template_robustness(results: dict) -> go.Figure:
    """R² per layer under each prompt template, one panel per dataset."""
    names = list(results["datasets"])
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        for template, run in results["datasets"][name]["templates"].items():
            fig.add_trace(go.Scatter(y=run["r2"], mode="lines", name=template, legendgroup=template,
                                     showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="Robustness to the prompt template (test R² by layer)", template="plotly_white")
    return fig


def place_map(run, scope: str) -> go.Figure:
    """Predicted positions of test entities (best layer), coloured by their true longitude."""
    pred, true = np.asarray(run.predictions), np.asarray(run.truth)
    fig = go.Figure(go.Scattergeo(lat=pred[:, 0], lon=pred[:, 1], mode="markers", name="predicted",
                                  marker=dict(size=4, color=true[:, 1], colorscale="Rainbow",
                                              colorbar=dict(title="true longitude"))))
    fig.add_trace(go.Scattergeo(lat=true[:, 0], lon=true[:, 1], mode="markers", name="true",
                                marker=dict(size=2, color="black", opacity=0.3)))
    geo = dict(showland=True, landcolor="rgb(235,235,235)", showcountries=True)
    if scope == "usa":
        geo["scope"] = "usa"
    elif scope == "nyc":
        geo.update(fitbounds="locations", resolution=50)
    else:
        geo["projection_type"] = "natural earth"
    fig.update_geos(**geo)
    fig.update_layout(title=f"{run.dataset}: predicted locations (layer {run.best_layer}, R² {run.best_r2:.2f})")
    return fig


def time_scatter(run) -> go.Figure:
    """Predicted vs true year of test entities at the best layer."""
    pred, true = np.asarray(run.predictions)[:, 0], np.asarray(run.truth)[:, 0]
    lo, hi = float(true.min()), float(true.max())
    fig = go.Figure(go.Scatter(x=true, y=pred, mode="markers", name="entities", marker=dict(size=4, opacity=0.6)))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash")))
    fig.update_layout(title=f"{run.dataset}: predicted vs true year (layer {run.best_layer}, R² {run.best_r2:.2f})",
                      xaxis_title="true year", yaxis_title="predicted year", template="plotly_white")
    return fig


def heldout_bars(results: dict) -> go.Figure:
    """R² on a block unseen in training vs the same rows with the block seen, per dataset."""
    names = [n for n, e in results["datasets"].items() if e["heldout_blocks"]]
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        rows = results["datasets"][name]["heldout_blocks"]
        blocks = [r["block"] for r in rows]
        for key, label, color in [("r2_seen", "block seen in training", "#4c78a8"),
                                  ("r2_heldout", "block held out", "#f58518")]:
            fig.add_trace(go.Bar(x=blocks, y=[r[key] for r in rows], name=label, marker_color=color,
                                 legendgroup=key, showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="Generalisation to held-out blocks (test R² within the block)", barmode="group",
                      template="plotly_white")
    return fig


# The files write_all writes (a run folder's figures, replaced as a whole by the next run).
FIGURE_FILES = ("r2_by_layer.html", "spearman_by_layer.html", "templates.html", "heldout_blocks.html",
                "*_predictions.html")


def write_all(results: dict, runs: dict, out: Path) -> list[Path]:
    """Every figure as HTML in ``out`` (plotly.js written once beside them), each file atomically."""
    figures = {"r2_by_layer": r2_by_layer(results), "spearman_by_layer": r2_by_layer(results, "spearman"),
               "templates": template_robustness(results), "heldout_blocks": heldout_bars(results)}
    for name, by_template in runs.items():
        run = next(iter(by_template.values()))
        figures[f"{name}_predictions"] = (place_map(run, MAP_SCOPES[name]) if name in MAP_SCOPES
                                          else time_scatter(run))
    return [write_figure(fig, out / f"{name}.html") for name, fig in figures.items()]
