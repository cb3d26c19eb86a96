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
    """Proximity error (the paper's score; 0 is perfect, 0.5 chance) of a block unseen in training vs the same rows
    with the block seen, per dataset, against every test entity (``heldout_block_scores``)."""
    names = [n for n, e in results["datasets"].items() if e.get("heldout_block_scores")]
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        rows = results["datasets"][name]["heldout_block_scores"]
        blocks = [r["block"] for r in rows]
        for key, label, color in [("proximity_error_seen", "block seen in training", "#4c78a8"),
                                  ("proximity_error_heldout", "block held out", "#f58518")]:
            fig.add_trace(go.Bar(x=blocks, y=[r[key] for r in rows], name=label, marker_color=color,
                                 legendgroup=key, showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="Generalisation to held-out blocks (proximity error against every test entity; "
                            "lower is better, 0.5 is chance)", barmode="group", template="plotly_white")
    fig.update_yaxes(range=[0, 1])
    return fig


def report_tables(results: dict) -> list[Table]:
    """The numbers README quotes (best layer and test R² per dataset, with scikit-learn's, the embedding's and the
    other templates') and place errors (held-out blocks: :func:`heldout_score_table`)."""
    templates = results.get("templates", [])[1:]
    rows = []
    for name, e in results["datasets"].items():
        rows.append([name, e["best_layer"], e["best_r2"], e["sklearn_ridgecv_r2_at_best_layer"], e["r2"][0],
                     *[e["templates"][t]["best_r2"] for t in templates], e["n_train"], e["n_test"],
                     e.get("median_error_km"), e.get("proximity_error")])
    columns = ["dataset", "best layer", "test R²", "scikit-learn R²", "R² at the embedding",
               *[f"best R², {t} template" for t in templates], "n train", "n test", "median error (km)",
               "proximity error"]
    return [Table("Probes by dataset (first template, held-out test split)", columns, rows,
                  "R² of latitude and longitude together for places; proximity error: fraction of entities closer to "
                  "the truth than the prediction (0 is perfect).")]


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
    figs.update(comparison_figures(results))
    return figs


# The files write_all writes (a run folder's figures and report page, replaced as a whole by the next run).
FIGURE_FILES = ("r2_by_layer.html", "spearman_by_layer.html", "templates.html", "heldout_blocks.html",
                "*_predictions.html", "ridge_vs_mlp.html", "ridge_vs_mlp_scatter.html", "pca_by_k.html",
                "pca_by_layer.html", "prompt_transfer.html", "prompt_cosine.html", "entity_type_transfer.html",
                "train_test_gap.html", "r2_by_target.html", "models_side_by_side.html", REPORT)


def write_all(results: dict, runs: dict, out: Path) -> list[Path]:
    """Every figure as HTML in ``out`` (plotly.js written once beside them) and the report page ``index.html``
    showing them with the run's settings and numbers, each file atomically."""
    figs = figures(results, runs)
    settings = {**results["settings"], "complete": results.get("complete")}
    page = Page(f"Space and time probes: {results['model']}", settings,
                [*report_tables(results), *control_tables(results), peak_table(results),
                 *(t for t in (comparison_table(results), heldout_score_table(results), neuron_weight_table(results))
                   if t is not None)], figs)
    return [*(write_figure(fig, out / f"{name}.html") for name, fig in figs.items()), write_report(out, page)]


# ------------------------------------------------------------------------- the comparisons behind the paper's claims

def _with(results: dict, key: str) -> list[str]:
    """Datasets whose entry holds ``key`` (an analysis the run did not skip)."""
    return [name for name, e in results["datasets"].items() if e.get(key)]


def _panels(names: list[str], title: str, shared_yaxes: bool = True) -> go.Figure:
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=shared_yaxes)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def ridge_vs_mlp(results: dict) -> go.Figure:
    """Test R² by layer of ridge and of the MLP probe, with 95% bootstrap intervals, one panel per dataset."""
    names = _with(results, "ridge_vs_mlp")
    fig = _panels(names, "Linear or not: ridge against the MLP probe (test R² by layer, 95% bootstrap intervals)")
    for col, name in enumerate(names, start=1):
        c = results["datasets"][name]["ridge_vs_mlp"]
        for key, colour in (("ridge", PALETTE[0]), ("mlp", PALETTE[1])):
            r2 = np.asarray(c[f"{key}_r2"])
            lo, hi = np.asarray(c[f"{key}_ci95"]).T
            fig.add_trace(go.Scatter(x=c["layers"], y=r2, mode="lines+markers", name=key, legendgroup=key,
                                     showlegend=col == 1, line=dict(color=colour),
                                     error_y=dict(type="data", symmetric=False, array=hi - r2,
                                                  arrayminus=r2 - lo)), row=1, col=col)
    fig.update_yaxes(range=[-0.5, 1])
    return fig


def ridge_vs_mlp_scatter(results: dict) -> go.Figure:
    """The MLP probe's test predictions against ridge's at ridge's best layer (first target), one panel per
    dataset: on the diagonal, the MLP reads nothing ridge does not."""
    names = _with(results, "ridge_vs_mlp")
    fig = _panels(names, "MLP against ridge predictions on the test split (ridge's best layer, first target)", False)
    for col, name in enumerate(names, start=1):
        p = results["datasets"][name]["ridge_vs_mlp"]["predictions_at_best_layer"]
        ridge, mlp = np.asarray(p["ridge"])[:, 0], np.asarray(p["mlp"])[:, 0]
        lo, hi = float(min(ridge.min(), mlp.min())), float(max(ridge.max(), mlp.max()))
        fig.add_trace(go.Scatter(x=ridge, y=mlp, mode="markers", name="test entities", showlegend=col == 1,
                                 marker=dict(size=4, opacity=0.6, color=PALETTE[0])), row=1, col=col)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", showlegend=col == 1,
                                 line=dict(dash="dash", color="grey")), row=1, col=col)
    fig.update_xaxes(title_text="ridge prediction")
    fig.update_yaxes(title_text="MLP prediction", col=1)
    return fig


def pca_by_k(results: dict) -> go.Figure:
    """Test R² (Spearman for time, dashed) on the top-k principal components at the best layer against k, and the
    explained-variance ratio of those k (dotted), one panel per dataset."""
    names = _with(results, "pca")
    fig = _panels(names, "How many dimensions: probes on the top-k principal components (best layer)")
    for col, name in enumerate(names, start=1):
        p = results["datasets"][name]["pca"]
        best = p["at_best_layer"]
        curves = [("test R²", best["r2"], "solid", PALETTE[0]),
                  ("explained variance", best["explained_variance_ratio"], "dot", "grey")]
        if "spearman" in best:
            curves.append(("Spearman", best["spearman"], "dash", PALETTE[2]))
        for label, values, dash, colour in curves:
            fig.add_trace(go.Scatter(x=p["ks"], y=values, mode="lines+markers", name=label, legendgroup=label,
                                     showlegend=col == 1, line=dict(dash=dash, color=colour)), row=1, col=col)
    fig.update_xaxes(type="log", title_text="k principal components")
    fig.update_yaxes(range=[-0.2, 1])
    return fig


def pca_by_layer(results: dict) -> go.Figure:
    """Test R² by layer on the top-k principal components (k = 10 by default) beside the full ridge probe."""
    names = [n for n in _with(results, "pca") if "layer_curve" in results["datasets"][n]["pca"]]
    fig = go.Figure()
    for i, name in enumerate(names):
        e, colour = results["datasets"][name], PALETTE[i % len(PALETTE)]
        curve = e["pca"]["layer_curve"]
        fig.add_trace(go.Scatter(x=e["layers"], y=e["r2"], mode="lines", name=f"{name}, all dimensions",
                                 line=dict(color=colour)))
        fig.add_trace(go.Scatter(x=e["layers"], y=curve["r2"], mode="lines", name=f"{name}, top {curve['k']} PCs",
                                 line=dict(color=colour, dash="dash")))
    fig.update_layout(title="Test R² by layer: every dimension against the top principal components",
                      xaxis_title="layer", yaxis_title="test R²", template="plotly_white", yaxis_range=[-0.2, 1])
    return fig


def _heatmaps(results: dict, key: str, matrix: str, labels: str, title: str, zrange: tuple[float, float]
              ) -> go.Figure:
    """One heatmap per dataset of ``entry[key][matrix]`` (rows: trained on, columns: tested on)."""
    names = _with(results, key)
    fig = _panels(names, title, False)
    for col, name in enumerate(names, start=1):
        a = results["datasets"][name][key]
        z = np.asarray(a[matrix], dtype=float)
        fig.add_trace(go.Heatmap(z=z, x=a[labels], y=a[labels], zmin=zrange[0], zmax=zrange[1],
                                 colorscale="RdBu", reversescale=matrix == "proximity_error",
                                 text=np.round(z, 2), texttemplate="%{text}", showscale=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="tested on")
    fig.update_yaxes(title_text="trained on", col=1, autorange="reversed")
    return fig


def prompt_transfer(results: dict, matrix: str = "r2") -> go.Figure:
    """The cross-prompt transfer matrix (``"r2"``: a probe trained on one prompt reads another's test entities)
    or the cosine of the probe directions (``"cosine"``), at the best layer, per dataset."""
    what = "test R²" if matrix == "r2" else "cosine of the probe directions"
    return _heatmaps(results, "prompt_robustness", matrix, "prompts",
                     f"Robust to the prompt: {what} across prompts (best layer)", (-1, 1))


def entity_type_transfer(results: dict, matrix: str = "r2") -> go.Figure:
    """Probes trained on one entity type, tested on each (R² against the whole test set's variance)."""
    return _heatmaps(results, "entity_type_transfer", matrix, "types",
                     "Unified across entity types: trained on one type, tested on each (best layer, test R² "
                     "against the whole test set's variance)", (-1, 1))


def train_test_gap(results: dict) -> go.Figure:
    """Train and test R² of the ridge probe by layer (the gap is how much it overfits), one line pair per dataset."""
    fig = go.Figure()
    for i, name in enumerate(_with(results, "ridge_views")):
        e, colour = results["datasets"][name], PALETTE[i % len(PALETTE)]
        for key, dash in (("train_r2", "dot"), ("test_r2", "solid")):
            fig.add_trace(go.Scatter(x=e["layers"], y=e["ridge_views"][key], mode="lines", line=dict(color=colour,
                                     dash=dash), name=f"{name}, {key.split('_')[0]}"))
    fig.update_layout(title="Train (dotted) and test R² of the ridge probe by layer", xaxis_title="layer",
                      yaxis_title="R²", template="plotly_white", yaxis_range=[-0.2, 1])
    return fig


def r2_by_target(results: dict) -> go.Figure:
    """Test R² by layer of each target separately (latitude and longitude for places), per dataset."""
    fig = go.Figure()
    for i, name in enumerate(_with(results, "ridge_views")):
        e = results["datasets"][name]
        for j, (target, r2) in enumerate(e["ridge_views"]["r2_by_target"].items()):
            fig.add_trace(go.Scatter(x=e["layers"], y=r2, mode="lines", name=f"{name}: {target}",
                                     line=dict(color=PALETTE[i % len(PALETTE)], dash=("solid", "dash")[j % 2])))
    fig.update_layout(title="Test R² by layer of each target", xaxis_title="layer", yaxis_title="test R²",
                      template="plotly_white", yaxis_range=[-0.2, 1])
    return fig


def models_side_by_side(comparison: dict) -> go.Figure:
    """Test R² against depth (layer / number of layers) of the same probes on several models, one panel per
    dataset (``results["models_side_by_side"]``)."""
    models = comparison["models"]
    names = list(models[0]["r2"]) if models else []
    fig = _panels(names, f"Models side by side: test R² by depth ({comparison['template']} prompt)")
    for i, m in enumerate(models):
        for col, name in enumerate(names, start=1):
            fig.add_trace(go.Scatter(x=m["depth"], y=m["r2"][name], mode="lines", name=m["name"],
                                     legendgroup=m["name"], showlegend=col == 1,
                                     line=dict(color=PALETTE[i % len(PALETTE)])), row=1, col=col)
    fig.update_xaxes(title_text="depth (layer / layers)", range=[0, 1])
    fig.update_yaxes(range=[-0.2, 1])
    return fig


def comparison_table(results: dict) -> Table | None:
    """Ridge, MLP and PCA-k test R² at ridge's best layer per dataset, with 95% bootstrap intervals, and the
    paired MLP - ridge difference (the table the README quotes)."""
    names = _with(results, "ridge_vs_mlp") or _with(results, "pca")
    if not names:
        return None
    ks = next((results["datasets"][n]["pca"]["ks"] for n in names if "pca" in results["datasets"][n]), [])
    rows = []
    for name in names:
        e = results["datasets"][name]
        c, p = e.get("ridge_vs_mlp"), e.get("pca")
        cells = [f"{e['peak']['r2']:.3f} {interval(e['peak'])}"]
        if c:
            layer, d = e["best_layer"], c["mlp_minus_ridge_at_best_layer"]
            cells += [f"{c['mlp_r2'][layer]:.3f} {interval({'ci95': c['mlp_ci95'][layer]})}",
                      f"{d['difference']:+.3f} {interval(d)}"]
        if p:
            best = p["at_best_layer"]
            cells += [f"{r:.3f} {interval({'ci95': ci})}" for r, ci in zip(best["r2"], best["ci95"], strict=True)]
        rows.append([name, e["best_layer"], *cells, e["n_test"]])
    columns = ["ridge", *(["MLP", "MLP - ridge"] if _with(results, "ridge_vs_mlp") else []),
               *[f"PCA k={k}" for k in ks]]
    return Table("Ridge, MLP and PCA-k probes at the best layer (test R², 95% bootstrap interval)",
                 ["dataset", "best layer", *columns, "n test"], rows,
                 "MLP - ridge: paired bootstrap over the same test entities; an interval that holds 0 is noise.")


def neuron_weight_table(results: dict) -> Table | None:
    """Per dataset and target, the top neurons by the cosine of their output weights with the probe direction and
    by activation correlation, with both measures."""
    rows = []
    for name in _with(results, "neuron_weights"):
        n = results["datasets"][name]["neuron_weights"]
        for target, t in n["targets"].items():
            for by, key in (("output weights", "by_output_weight"), ("activation", "by_activation")):
                rows += [[name, n["layer"], target, by, r["neuron"], r["cos_out"], r.get("cos_in"),
                          r.get("cos_gate"), r["correlation"]] for r in t[key][:3]]
    if not rows:
        return None
    return Table("Neurons by their weights (top 3 by each measure)",
                 ["dataset", "MLP layer", "target", "ranked by", "neuron", "cos(out, probe)", "cos(in, probe)",
                  "cos(gate, probe)", "correlation with the target"], rows,
                 "cos: the neuron's output weights (its column of the down projection) or input rows against the "
                 "probe direction at the best layer; correlation: of its activation with the target (train split).")


def heldout_score_table(results: dict) -> Table | None:
    """Held-out blocks as the paper scores them: proximity error against every test entity, and R² against the
    whole test set's variance."""
    rows = [[name, b["block"], b["n_test"], b["proximity_error_seen"], b["proximity_error_heldout"],
             b["r2_seen_vs_test_variance"], b["r2_heldout_vs_test_variance"]]
            for name in _with(results, "heldout_block_scores")
            for b in results["datasets"][name]["heldout_block_scores"]]
    if not rows:
        return None
    return Table("Held-out blocks, scored as the paper does (best layer)",
                 ["dataset", "block", "n test", "proximity error, seen", "proximity error, held out",
                  "R² vs test variance, seen", "R² vs test variance, held out"], rows,
                 "Proximity error: the fraction of all test entities closer to the truth than the prediction (0 is "
                 "perfect, 0.5 is chance). R² uses the variance of the whole test set, not the block's own.")


def comparison_figures(results: dict) -> dict[str, go.Figure]:
    """The figures of the analyses the run did, by file stem."""
    figs = {}
    if _with(results, "ridge_vs_mlp"):
        figs.update(ridge_vs_mlp=ridge_vs_mlp(results), ridge_vs_mlp_scatter=ridge_vs_mlp_scatter(results))
    if _with(results, "pca"):
        figs.update(pca_by_k=pca_by_k(results), pca_by_layer=pca_by_layer(results))
    if _with(results, "prompt_robustness"):
        figs.update(prompt_transfer=prompt_transfer(results), prompt_cosine=prompt_transfer(results, "cosine"))
    if _with(results, "entity_type_transfer"):
        figs["entity_type_transfer"] = entity_type_transfer(results)
    if _with(results, "ridge_views"):
        figs.update(train_test_gap=train_test_gap(results), r2_by_target=r2_by_target(results))
    if results.get("models_side_by_side"):
        figs["models_side_by_side"] = models_side_by_side(results["models_side_by_side"])
    return figs

