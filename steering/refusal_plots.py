"""Figures and report page of the refusal-direction experiment (plotly), built from its results dict and the
candidates' selection scores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.files import write_figure
from probes.report import (
    DIFFERENCE_COLUMNS,
    RATE_COLUMNS,
    REPORT,
    Page,
    Table,
    difference_cells,
    interval,
    rate_cells,
    write_report,
)

if TYPE_CHECKING:
    from steering.refusal import CandidateScore

# The files write_all writes (replaced as a whole by the next run in the folder).
FIGURE_FILES = ("selection_heatmaps.html", "refusal_rates.html", "tradeoff.html", "geometry.html",
                "candidate_cosines.html", REPORT)


def selection_heatmaps(scores: Sequence[CandidateScore]) -> go.Figure:
    """Three heatmaps over position x layer: refusal after ablation, refusal after addition, KL."""
    positions = sorted({s.position for s in scores})
    layers = sorted({s.layer for s in scores})
    titles = {"ablation_refusal": "refusal score, harmful, ablated", "addition_refusal":
              "refusal score, harmless, added", "kl": "KL on harmless, ablated"}
    # the panels share the position axis (titled once); each colour bar sits in the gap right of its own panel
    fig = make_subplots(rows=1, cols=3, subplot_titles=list(titles.values()), horizontal_spacing=0.1,
                        shared_yaxes=True)
    for col, key in enumerate(titles, start=1):
        by_cell = {(s.position, s.layer): getattr(s, key) for s in scores}
        grid = [[by_cell.get((position, layer)) for layer in layers] for position in positions]
        right = fig.layout[f"xaxis{col if col > 1 else ''}"].domain[1]
        colours = dict(colorscale="Reds") if key == "kl" else dict(colorscale="RdBu_r", zmid=0)  # log-odds: 0 = even
        fig.add_trace(go.Heatmap(z=grid, x=layers, y=[str(p) for p in positions], name=key, **colours,
                                 colorbar=dict(x=right + 0.005, xanchor="left", len=0.9, thickness=12)),
                      row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="position", row=1, col=1)
    fig.update_layout(title="Candidate refusal directions", height=380, margin=dict(r=60))
    return fig


def refusal_bars(results: dict) -> go.Figure:
    """Refusal rates with their 95% Wilson intervals, harmful and harmless test prompts, per condition."""
    rates = results["refusal_rate"]
    keys = list(rates)
    fig = go.Figure(go.Bar(
        x=[f"{k.replace('_', ' ')}<br>n={rates[k]['n']}" for k in keys], y=[rates[k]["rate"] for k in keys],
        marker_color=["#d62728" if k.startswith("harmful") else "#4c78a8" for k in keys],
        error_y=dict(type="data", symmetric=False, array=[rates[k]["ci95"][1] - rates[k]["rate"] for k in keys],
                     arrayminus=[rates[k]["rate"] - rates[k]["ci95"][0] for k in keys])))
    fig.update_layout(title=f"{results['model']}: refusal rate on held-out prompts (bars: 95% Wilson interval)",
                      yaxis_title="refusal rate", yaxis_range=[0, 1.05], template="plotly_white")
    return fig


def tradeoff(scores: Sequence[CandidateScore], best: dict, kl_max: float) -> go.Figure:
    """Every candidate as a point: refusal score on harmful prompts after ablating it against the KL it causes on
    harmless ones (log axis); kept and filtered-out candidates apart, the selected one (``best``: its scores) starred,
    the KL filter ``kl_max`` drawn as a line (candidates whose addition does not induce refusal are filtered out
    too)."""
    fig = go.Figure()
    for kept, colour in ((True, "#2ca02c"), (False, "#aaaaaa")):
        group = [s for s in scores if s.kept == kept]
        fig.add_trace(go.Scatter(
            x=[max(s.kl, 1e-6) for s in group], y=[s.ablation_refusal for s in group], mode="markers",
            name="kept" if kept else "filtered out", marker=dict(color=colour, size=7),
            text=[f"layer {s.layer}, position {s.position}, addition {s.addition_refusal:.2f}" for s in group]))
    fig.add_trace(go.Scatter(x=[max(best["kl"], 1e-6)], y=[best["ablation_refusal"]], mode="markers", name="selected",
                             marker=dict(symbol="star", size=16, color="#d62728")))
    fig.add_vline(x=kl_max, line_dash="dash", annotation_text="KL filter")
    fig.update_layout(title="Refusal after ablation vs KL on harmless prompts, every candidate", xaxis_type="log",
                      xaxis_title="KL(baseline || ablated), harmless", yaxis_title="refusal log-odds, harmful, ablated",
                      template="plotly_white", height=420)
    return fig


def _expression_traces(fig: go.Figure, expression: dict, label: str, dash: str) -> None:
    for kind, colour in (("harmful", "#d62728"), ("harmless", "#4c78a8")):
        fig.add_trace(go.Scatter(x=expression["layers"], y=expression[kind]["mean"], name=f"{label}, {kind}",
                                 line=dict(color=colour, dash=dash),
                                 error_y=dict(type="data", array=expression[kind]["std"], thickness=1)), row=1, col=1)


def geometry_figure(results: dict) -> go.Figure:
    """Left: cosine of the selected direction with the last-token activations per layer (mean, bars one standard
    deviation), in the model and (dashed) in the base model. Right: the base model's own difference in means
    against the model's, cosine per layer."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["cos(r, last-token activation)",
                                                         "cos(base model's direction, this model's)"])
    if "geometry" in results:
        _expression_traces(fig, results["geometry"]["expression"], results["model"], "solid")
    if "base_model" in results:
        base = results["base_model"]
        _expression_traces(fig, base["expression"], base["model"], "dash")
        cosine = base["direction_cosine"]
        fig.add_trace(go.Scatter(x=cosine["layers"], y=cosine["cosine"], name="base vs model direction",
                                 line=dict(color="black")), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Where the direction is expressed", template="plotly_white", height=420)
    return fig


def candidate_cosine_figure(results: dict) -> go.Figure:
    """The cosine matrix of the candidate directions across layers and positions."""
    cosines = results["geometry"]["candidate_cosines"]
    labels = [f"p{p} L{layer}" for p, layer in cosines["labels"]]
    fig = go.Figure(go.Heatmap(z=cosines["matrix"], x=labels, y=labels, colorscale="RdBu_r", zmid=0, zmin=-1, zmax=1))
    fig.update_layout(title="Cosine between candidate directions (position p, layer L)", height=600, width=700)
    return fig


def _rate_tables(name: str, evaluation: dict) -> list[Table]:
    """One evaluation set's refusal rates and its edits against the baseline."""
    rates = Table(f"Refusal rate on held-out prompts ({name})", ["prompts, condition", *RATE_COLUMNS],
                  [[k.replace("_", ", ", 1).replace("_", " "), *rate_cells(v)]
                   for k, v in evaluation["refusal_rate"].items()],
                  "Substring judge (REFUSAL_PHRASES) unless the settings name another judge. The README quotes "
                  "these as harmful/harmless refused.")
    diffs = Table(f"Edits against the baseline on the same prompts ({name})", ["comparison", *DIFFERENCE_COLUMNS],
                  [[k.replace("_", " "), *difference_cells(v)] for k, v in evaluation["comparisons"].items()],
                  "Difference of refusal rates; 95% interval from 2,000 seeded resamples of the prompts (paired).")
    return [rates, diffs]


def _analysis_tables(results: dict) -> list[Table]:
    """The tables of the analyses the run made: expression at the selected layer, the base model, the general-text
    loss, the completion length, the safety score."""
    tables = []
    for key, who in (("geometry", results["model"]), ("base_model", "the base model")):
        if key in results:
            entry = results[key]["expression"]
            diff = entry["harmful_minus_harmless"]
            tables.append(Table(f"cos(r, last-token activation) at layer {entry['at_layer']}, {who}",
                                ["harmful - harmless", "95% CI (Welch)", "n harmful, harmless",
                                 "larger than the noise"],
                                [[f"{diff['difference']:+.4f}", interval(diff), ", ".join(map(str, diff["n"])),
                                  "yes" if diff["excludes_zero"] else "no (within the noise)"]]))
    if "base_model" in results:
        tables += _rate_tables("base model, organism's direction", results["base_model"])
    for source, entry in results.get("general_loss", {}).items():
        tables.append(Table(f"Loss on general text ({source})", ["condition", "loss", "95% CI", "n texts"],
                            [[k.replace("_", " "), f"{v.get('loss', v.get('difference')):+.4f}", interval(v), v["n"]]
                             for k, v in entry.items()],
                            "Mean cross-entropy per token of each text; CI: bootstrap over texts (paired for the "
                            "differences)."))
    lengths = results.get("length_sensitivity")
    if lengths:
        tables.append(Table(f"Refusal judged on the first {lengths['short_tokens']} vs all "
                            f"{lengths['max_new_tokens']} tokens", ["set, condition", "short", "full", "full - short",
                                                                    "95% CI (paired bootstrap)"],
                            [[f"{name}, {k.replace('_', ' ')}", v["short"]["rate"], v["full"]["rate"],
                              f"{v['full_minus_short']['difference']:+.3f}", interval(v["full_minus_short"])]
                             for name, rates in lengths.items() if isinstance(rates, dict) for k, v in rates.items()]))
    safety = [[name, k.replace("_", " "), *rate_cells(v)] for name, entry in results["evaluation"].items()
              for k, v in entry.get("safety_rate", {}).items()]
    if safety:
        tables.append(Table("Safety score (fraction judged safe by the safety classifier)",
                            ["set", "condition", *RATE_COLUMNS], safety))
    return tables


def figures(results: dict, scores: Sequence[CandidateScore]) -> dict[str, go.Figure]:
    """The run's figures by file stem: those of the analyses only when the run made them."""
    shown = {"refusal_rates": refusal_bars(results), "selection_heatmaps": selection_heatmaps(scores)}
    if "selection_filters" in results:
        shown["tradeoff"] = tradeoff(scores, results["selection"], results["selection_filters"]["kl_max"])
    if "geometry" in results or "base_model" in results:
        shown["geometry"] = geometry_figure(results)
    if "geometry" in results:
        shown["candidate_cosines"] = candidate_cosine_figure(results)
    return shown


def report_page(results: dict, shown: dict[str, go.Figure]) -> Page:
    """The run's report page: settings, refusal rates with intervals and the edits against their baseline (for
    each evaluation set), the selected direction, the analyses' tables, and the figures."""
    direction = Table("Selected direction", ["", "value"], [
        ["layer", results["direction"]["layer"]], ["position", results["direction"]["position"]],
        ["candidates kept / scored", f"{results['n_kept']} / {results['n_candidates']}"],
        ["KL filter relaxed", results["kl_filter_relaxed"]],
        ["KL on harmless prompts, ablated", results["kl_harmless_ablation"]],
        ["max |logit| difference, weights vs hooks", results["max_abs_logit_diff_orthogonalized_vs_hooks"]],
        ["KL, weights vs hooks", results["kl_orthogonalized_vs_hooks"]],
        ["excluded dimensions", results["excluded_dims"]], ["checkpoint", results["checkpoint"]]])
    rates = [t for name, entry in results["evaluation"].items() for t in _rate_tables(name, entry)]
    seconds = results.get("step_seconds", {})
    timing = [Table("Wall time per step", ["step", "seconds"], [[k, round(v, 1)] for k, v in seconds.items()])]
    return Page(f"Refusal direction: {results['model']}", results["settings"],
                [*rates, direction, *_analysis_tables(results), *(timing if seconds else [])], shown)


def write_all(results: dict, scores: Sequence[CandidateScore], out: Path) -> list[Path]:
    """The figures as HTML in ``out`` (plotly.js once, beside them) and the report page ``index.html``, each file
    atomically."""
    shown = figures(results, scores)
    return [*(write_figure(fig, out / f"{stem}.html") for stem, fig in shown.items()),
            write_report(out, report_page(results, shown))]
