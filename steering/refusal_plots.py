"""Figures and report page of the refusal-direction experiment (plotly), built from its results dict and the
candidates' selection scores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.files import write_figure
from probes.report import (DIFFERENCE_COLUMNS, RATE_COLUMNS, REPORT, Page, Table, difference_cells, rate_cells,
                           write_report)

if TYPE_CHECKING:
    from steering.refusal import CandidateScore

# The files write_all writes (replaced as a whole by the next run in the folder).
FIGURE_FILES = ("selection_heatmaps.html", "refusal_rates.html", REPORT)


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


def report_page(results: dict, heatmaps: go.Figure) -> Page:
    """The run's report page: settings, refusal rates with intervals and the edits against their baseline (for
    each evaluation set), the selected direction, and the figures."""
    direction = Table("Selected direction", ["", "value"], [
        ["layer", results["direction"]["layer"]], ["position", results["direction"]["position"]],
        ["candidates kept / scored", f"{results['n_kept']} / {results['n_candidates']}"],
        ["KL filter relaxed", results["kl_filter_relaxed"]],
        ["KL on harmless prompts, ablated", results["kl_harmless_ablation"]],
        ["max |logit| difference, weights vs hooks", results["max_abs_logit_diff_orthogonalized_vs_hooks"]],
        ["KL, weights vs hooks", results["kl_orthogonalized_vs_hooks"]],
        ["excluded dimensions", results["excluded_dims"]], ["checkpoint", results["checkpoint"]]])
    rates = [t for name, entry in results["evaluation"].items() for t in _rate_tables(name, entry)]
    figures = {"refusal_rates": refusal_bars(results), "selection_heatmaps": heatmaps}
    return Page(f"Refusal direction: {results['model']}", results["settings"], [*rates, direction], figures)


def write_all(results: dict, scores: Sequence[CandidateScore], out: Path) -> list[Path]:
    """The figures as HTML in ``out`` (plotly.js once, beside them) and the report page ``index.html``, each file
    atomically."""
    heatmaps = selection_heatmaps(scores)
    return [write_figure(heatmaps, out / "selection_heatmaps.html"),
            write_figure(refusal_bars(results), out / "refusal_rates.html"),
            write_report(out, report_page(results, heatmaps))]
