"""Figures and report page of the adversarial-suffix analysis (:mod:`steering.suffix_attack`), from its results."""

from __future__ import annotations

from pathlib import Path

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
    rate_cells,
    write_report,
)

FIGURE_FILES = ("expression.html", "head_attention.html", "gcg_loss.html", REPORT)
COLOURS = {"none": "#444", "random": "#1f77b4", "adversarial": "#d62728"}
CONDITIONS = tuple(COLOURS)


def expression_figure(results: dict) -> go.Figure:
    """Cosine of r̂ with the last token's stream by layer, one line per condition (band: one standard deviation)."""
    expression = results["expression"]
    fig = go.Figure()
    for c in CONDITIONS:
        mean, std = expression[c]["mean"], expression[c]["std"]
        fig.add_trace(go.Scatter(x=expression["layers"], y=mean, name=c, line=dict(color=COLOURS[c]),
                                 error_y=dict(type="data", array=std, visible=True, thickness=0.6)))
    fig.add_vline(x=expression["at_layer"], line_dash="dot", annotation_text="r̂ selected here")
    fig.update_layout(title="Expression of r̂ at the last token", xaxis_title="layer (stream entering the block)",
                      yaxis_title="cosine with r̂", height=420)
    return fig


def head_attention_figure(results: dict) -> go.Figure:
    """For each top head: attention from the last token to the instruction and to the suffix, by condition."""
    heads = results["top_heads"]
    labels = [f"L{h['layer']}H{h['head']}" for h in heads]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["attention to the instruction", "attention to the suffix"],
                        shared_yaxes=True)
    for col, span in enumerate(("instruction", "suffix"), start=1):
        for c in CONDITIONS:
            fig.add_trace(go.Bar(x=labels, y=[h[span][c] for h in heads], name=c, marker_color=COLOURS[c],
                                 showlegend=col == 1), row=1, col=col)
    fig.update_layout(title="Top heads by attribution to r̂: where the last token attends", barmode="group",
                      yaxis_title="attention mass", height=420)
    return fig


def gcg_loss_figure(results: dict) -> go.Figure:
    """The kept suffix's target loss after each GCG step."""
    losses = results["suffix"]["losses"]
    fig = go.Figure(go.Scatter(x=list(range(len(losses))), y=losses, mode="lines+markers"))
    fig.update_layout(title=f"GCG: loss of the target {results['suffix']['target']!r}", xaxis_title="step",
                      yaxis_title="cross-entropy per target token", height=360)
    return fig


def figures(results: dict) -> dict[str, go.Figure]:
    return {"expression": expression_figure(results), "head_attention": head_attention_figure(results),
            "gcg_loss": gcg_loss_figure(results)}


def _tables(results: dict) -> list[Table]:
    suffix = results["suffix"]
    at = results["expression"]["at_layer"]
    return [
        Table("Suffixes", ["condition", "text", "tokens"],
              [["adversarial", suffix["suffix"], len(suffix["suffix_ids"])],
               ["random", results["random_suffix"], len(suffix["suffix_ids"])]],
              note=f"GCG on {suffix['instruction']!r} toward {suffix['target']!r}: loss {suffix['losses'][0]:.3f} -> "
                   f"{suffix['losses'][-1]:.3f} in {len(suffix['losses']) - 1} steps, {suffix['seconds']:.0f} s"),
        Table("Refusal rate on held-out harmful instructions", ["condition", *RATE_COLUMNS],
              [[c, *rate_cells(results["refusal"][c])] for c in CONDITIONS]),
        Table("Refusal: suffix minus none", ["condition", *DIFFERENCE_COLUMNS],
              [[c, *difference_cells(results["refusal_vs_none"][c])] for c in CONDITIONS[1:]]),
        Table(f"Cosine with r̂ at layer {at}: suffix minus none", ["condition", *DIFFERENCE_COLUMNS],
              [[c, *difference_cells(results["expression"]["vs_none_at_layer"][c])] for c in CONDITIONS[1:]]),
        Table("Top heads by direct attribution to r̂ (last token, no suffix)",
              ["head", *(f"attribution, {c}" for c in CONDITIONS), *(f"to instruction, {c}" for c in CONDITIONS),
               *(f"to suffix, {c}" for c in CONDITIONS[1:])],
              [[f"L{h['layer']}H{h['head']}", *(h["attribution"][c] for c in CONDITIONS),
                *(h["instruction"][c] for c in CONDITIONS), *(h["suffix"][c] for c in CONDITIONS[1:])]
               for h in results["top_heads"]]),
    ]


def report_page(results: dict) -> Page:
    return Page("Refusal direction under an adversarial suffix", results["settings"], _tables(results),
                figures(results))


def write_all(out: str | Path, results: dict) -> None:
    """Every figure as its own HTML file and the report page, in ``out``."""
    out = Path(out)
    page = report_page(results)
    for name, fig in page.figures.items():
        write_figure(fig, out / f"{name}.html")
    write_report(out, page)
