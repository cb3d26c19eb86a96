"""Plotly figures for the space and time probes; each takes the data that probes.space_time returns."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.datasets import DATA_DIR
from probes.files import write_figure
from probes.report import REPORT, Page, Table, interval, write_report

MAP_SCOPES = {"world_place": "world", "us_place": "usa", "nyc_place": "nyc"}
# Country outlines shipped with the project (Natural Earth 1:110m, public domain; see data/geo/README.md): maps are
# drawn on plain longitude/latitude axes, so nothing is fetched from a CDN and they render offline.
OUTLINES_FILE = DATA_DIR / "geo" / "countries_110m.json"
# Longitude and latitude ranges of each map (None: fitted to the true positions).
MAP_RANGES = {"world": ((-180.0, 180.0), (-60.0, 85.0)), "usa": ((-126.0, -66.0), (24.0, 50.0)), "nyc": None}
OUTLINES = "country outlines"
PALETTE = plotly.colors.qualitative.Plotly
# Legend label and line dash of each control curve in results["controls"][dataset].
CONTROL_STYLES = {"random_weights": ("random weights", "dash"), "shuffled_targets": ("shuffled targets", "dot")}


def r2_by_layer(results: dict, metric: str = "r2") -> go.Figure:
    """Test R² (or Spearman) per layer, one line per dataset; for R², the dataset's controls beside it."""
    fig = go.Figure()
    for i, (name, entry) in enumerate(results["datasets"].items()):
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=entry["layers"], y=entry[metric], mode="lines+markers", name=name,
                                 line=dict(color=colour)))
        if metric == "r2":
            add_controls(fig, name, entry["layers"], results.get("controls", {}).get(name, {}), colour)
    fig.update_layout(title=f"Probe {metric} on held-out entities by layer ({results['model']})",
                      xaxis_title="layer (residual stream after n blocks)", yaxis_title=metric, template="plotly_white")
    return fig


def add_controls(fig: go.Figure, dataset: str, layers: list[int], controls: dict[str, list[float]],
                 colour: str) -> None:
    """A dataset's control curves (random weights dashed, shuffled targets dotted) in its colour, one legend
    entry per kind of control for all datasets."""
    shown = {t.legendgroup for t in fig.data}
    for key, r2 in controls.items():
        label, dash = CONTROL_STYLES[key]
        fig.add_trace(go.Scatter(x=layers, y=r2, mode="lines", name=label, legendgroup=key,
                                 showlegend=key not in shown, opacity=0.7, line=dict(color=colour, dash=dash),
                                 hovertemplate=f"{dataset}, {label}<br>layer %{{x}}: R² %{{y:.3f}}<extra></extra>"))


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


@functools.lru_cache(maxsize=1)
def outline_lines() -> tuple[tuple, tuple]:
    """Every country outline as one (longitudes, latitudes) polyline, rings separated by None (one trace)."""
    lons: list[float | None] = []
    lats: list[float | None] = []
    for ring in (r for rings in json.loads(OUTLINES_FILE.read_text())["countries"].values() for r in rings):
        lons += [p[0] for p in ring] + [None]
        lats += [p[1] for p in ring] + [None]
    return tuple(lons), tuple(lats)


def _map_ranges(scope: str, true: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """The map's longitude and latitude ranges: fixed per scope, or the true positions' with a margin."""
    if MAP_RANGES.get(scope):
        return MAP_RANGES[scope]
    lo, hi = true.min(0), true.max(0)
    pad = 0.05 * (hi - lo) + 1e-3
    return (float(lo[1] - pad[1]), float(hi[1] + pad[1])), (float(lo[0] - pad[0]), float(hi[0] + pad[0]))


def place_map(run, scope: str) -> go.Figure:
    """Predicted positions of test entities (best layer), coloured by their true longitude, over the shipped
    country outlines on longitude/latitude axes (equirectangular, true to scale at the map's middle latitude)."""
    pred, true = np.asarray(run.predictions), np.asarray(run.truth)
    (x0, x1), (y0, y1) = _map_ranges(scope, true)
    fig = go.Figure()
    if scope != "nyc":
        lons, lats = outline_lines()
        fig.add_trace(go.Scatter(x=lons, y=lats, mode="lines", name=OUTLINES, hoverinfo="skip",
                                 line=dict(color="rgb(150,150,150)", width=0.7)))
    fig.add_trace(go.Scatter(x=pred[:, 1], y=pred[:, 0], mode="markers", name="predicted",
                             marker=dict(size=4, color=true[:, 1], colorscale="Rainbow",
                                         colorbar=dict(title="true longitude"))))
    fig.add_trace(go.Scatter(x=true[:, 1], y=true[:, 0], mode="markers", name="true",
                             marker=dict(size=3, color="black", opacity=0.4)))
    if scope == "nyc":
        fig.add_annotation(text="no outlines at this scale (the shipped Natural Earth 1:110m map has none for "
                                "New York City)", xref="paper", yref="paper", x=0, y=1.06, showarrow=False,
                           font=dict(size=11, color="grey"), xanchor="left")
    stretch = 1 / math.cos(math.radians((y0 + y1) / 2))  # a degree of latitude vs one of longitude, in km
    fig.update_xaxes(range=[x0, x1], title_text="longitude", showgrid=False, zeroline=False,
                     constrain="domain")
    fig.update_yaxes(range=[y0, y1], title_text="latitude", showgrid=False, zeroline=False, scaleanchor="x",
                     scaleratio=stretch, constrain="domain")
    fig.update_layout(title=f"{run.dataset}: predicted locations (layer {run.best_layer}, R² {run.best_r2:.2f})",
                      template="plotly_white", height=560, legend=dict(x=0, y=-0.12, orientation="h"))
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
    fig.update_layout(title="Generalisation to held-out blocks (test R² within the block; axis cut at -1)",
                      barmode="group", template="plotly_white")
    # a held-out R² of -150 would flatten every other bar: the axis stops at -1 (the report table has the values)
    fig.update_yaxes(range=[-1, 1])
    return fig


def report_tables(results: dict) -> list[Table]:
    """The numbers README quotes (best layer and test R² per dataset, with scikit-learn's, the embedding's and the
    other templates'), place errors, and the held-out blocks."""
    templates = results.get("templates", [])[1:]
    rows, blocks = [], []
    for name, e in results["datasets"].items():
        rows.append([name, e["best_layer"], e["best_r2"], e["sklearn_ridgecv_r2_at_best_layer"], e["r2"][0],
                     *[e["templates"][t]["best_r2"] for t in templates], e["n_train"], e["n_test"],
                     e.get("median_error_km"), e.get("proximity_error")])
        blocks += [[name, b["block"], b["n_test"], b["r2_seen"], b["r2_heldout"]] for b in e["heldout_blocks"]]
    columns = ["dataset", "best layer", "test R²", "scikit-learn R²", "R² at the embedding",
               *[f"best R², {t} template" for t in templates], "n train", "n test", "median error (km)",
               "proximity error"]
    return [Table("Probes by dataset (first template, held-out test split)", columns, rows,
                  "R² of latitude and longitude together for places; proximity error: fraction of entities closer to "
                  "the truth than the prediction (0 is perfect)."),
            Table("Held-out blocks (best layer)", ["dataset", "block", "n test", "R², block seen in training",
                                                   "R², block held out"], blocks)]


def control_tables(results: dict) -> list[Table]:
    """Peak test R² over the layers of each dataset's probe and of its controls (none when the run had none)."""
    if not results.get("controls"):
        return []
    rows = [[name, max(results["datasets"][name]["r2"]), *(max(c[key]) for key in CONTROL_STYLES)]
            for name, c in results["controls"].items()]
    return [Table("Controls (peak test R² over the layers)",
                  ["dataset", "trained weights", *(label for label, _ in CONTROL_STYLES.values())], rows,
                  "The same probe on a model of the same config with random weights (what the tokens alone give) "
                  "and on shuffled targets (what the probe fits from noise).")]


def peak_table(results: dict) -> Table:
    """Peak test R² of each dataset's probe and of its controls (when the run had them) with 95% bootstrap
    intervals, and the number of test entities they were resampled from (the same split for all three)."""
    peaks = results.get("control_peaks", {})
    labels = [label for label, _ in CONTROL_STYLES.values()] if peaks else []
    rows = []
    for name, e in results["datasets"].items():
        cells = [e["peak"], *(peaks[name][key] for key in CONTROL_STYLES)] if peaks else [e["peak"]]
        rows.append([name, *(f"{c['r2']:.3f} {interval(c)}" for c in cells), e["peak"]["n"]])
    return Table("Peak test R² (95% bootstrap interval over test entities)",
                 ["dataset", "trained weights", *labels, "n test"], rows,
                 "At each probe's best layer, the test entities resampled with replacement (seeded): how much the R² "
                 "would move on another test split of this size.")


def figures(results: dict, runs: dict) -> dict[str, go.Figure]:
    """Every figure of a run, by file stem."""
    figs = {"r2_by_layer": r2_by_layer(results), "spearman_by_layer": r2_by_layer(results, "spearman"),
            "templates": template_robustness(results), "heldout_blocks": heldout_bars(results)}
    for name, by_template in runs.items():
        run = next(iter(by_template.values()))
        figs[f"{name}_predictions"] = (place_map(run, MAP_SCOPES[name]) if name in MAP_SCOPES
                                       else time_scatter(run))
    return figs


# The files write_all writes (a run folder's figures and report page, replaced as a whole by the next run).
FIGURE_FILES = ("r2_by_layer.html", "spearman_by_layer.html", "templates.html", "heldout_blocks.html",
                "*_predictions.html", REPORT)


def write_all(results: dict, runs: dict, out: Path) -> list[Path]:
    """Every figure as HTML in ``out`` (plotly.js written once beside them) and the report page ``index.html``
    showing them with the run's settings and numbers, each file atomically."""
    figs = figures(results, runs)
    settings = {"model": results["model"], "entities per dataset": results.get("n"),
                "templates": results.get("templates"), "complete": results.get("complete")}
    page = Page(f"Space and time probes: {results['model']}", settings,
                [*report_tables(results), *control_tables(results), peak_table(results)], figs)
    return [*(write_figure(fig, out / f"{name}.html") for name, fig in figs.items()), write_report(out, page)]
