"""Figures of the SpARE experiment (plotly), built from its results dict."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from probes.cache import RESIDUAL_HOOK
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


TARGETS = ("steer_to_context", "steer_to_memory")


def steering_bars(results: dict) -> go.Figure:
    """Exact match toward the context answer and toward the memorised answer, per method, with 95% Wilson
    intervals as error bars."""
    def bar(method: str) -> go.Bar:
        rates = [results["exact_match"][t][method] for t in TARGETS]
        return go.Bar(name=method,
                      x=[f"{t.replace('_', ' ')} (n={r['n']})" for t, r in zip(TARGETS, rates, strict=True)],
                      y=[r["rate"] for r in rates],
                      error_y=dict(type="data", symmetric=False, array=[r["ci95"][1] - r["rate"] for r in rates],
                                   arrayminus=[r["rate"] - r["ci95"][0] for r in rates]))

    fig = go.Figure([bar(m) for m in METHODS])
    fig.update_layout(barmode="group", yaxis_title="exact match", yaxis_range=[0, 1.05],
                      title=f"{results['model']}: exact match on held-out conflict prompts (bars: 95% Wilson interval)")
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


def report_tables(results: dict) -> list[Table]:
    """Exact match per target and method (the README's table) with n and 95% intervals, the methods compared on
    the same prompts, the tuned settings and the split."""
    rates = Table("Exact match on held-out conflict prompts", ["steer toward", "method", *RATE_COLUMNS],
                  [[t.replace("_", " "), m, *rate_cells(e)] for t in TARGETS
                   for m, e in results["exact_match"][t].items()])
    diffs = Table("Methods compared on the same prompts", ["steer toward", "comparison", *DIFFERENCE_COLUMNS],
                  [[t.replace("_", " "), c.replace("_", " "), *difference_cells(e)] for t in TARGETS
                   for c, e in results["comparisons"][t].items()],
                  "Difference of exact match; 95% interval from 2,000 seeded resamples of the prompts (paired).")
    tuned = Table("Settings tuned on validation", ["method, target", "setting"],
                  [[k.replace("_", " "), v["label"]] for k, v in results["tuning"].items()])
    split = Table("Examples", ["split", "n", "unedited behaviour"],
                  [[{"tuning": "val, tuned on"}.get(k, k), n,
                    ", ".join(f"{g} {c}" for g, c in results["behaviour_counts"].get(k, {}).items())]
                   for k, n in results["n"].items()])
    kinds = results.get("known_facts_kinds", {})
    parts = [p for p in ("all", "train", "val", "test") if p in kinds]
    relations = Table("Relation kinds", ["relation kind", *parts],
                      [[kind.replace("_", " "), *(kinds[p].get(kind, 0) for p in parts)]
                       for kind in kinds.get("all", {})], "Facts of each kind in each split.")
    return [rates, diffs, tuned, split, *([relations] if parts else [])]


def figures(results: dict) -> dict[str, go.Figure]:
    """Every figure of a run, by file stem."""
    figs = {"probe_accuracy": probe_accuracy(results), "steering": steering_bars(results)}
    figs.update({f"latents_layer{layer}": mi_ranking(results, layer) for layer in results["spare_layers"]})
    return figs


# The files write_all writes (a run folder's figures and report page, replaced as a whole by the next run).
FIGURE_FILES = ("probe_accuracy.html", "steering.html", "latents_layer*.html", REPORT)


def write_all(results: dict, out: Path) -> list[Path]:
    """Every figure as HTML in ``out`` (plotly.js once, beside them) and the report page ``index.html`` showing
    them with the run's settings and numbers, each file atomically."""
    figs = figures(results)
    settings = {**results["settings"], "SAE hook points": results["sae_hooks"]}
    page = Page(f"SpARE: {results['model']}", settings, report_tables(results), figs)
    return [*(write_figure(fig, out / f"{name}.html") for name, fig in figs.items()), write_report(out, page)]
