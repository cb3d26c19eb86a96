"""Figures and report tables of the SpARE comparison (plotly), built from its results dict."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.cache import RESIDUAL_HOOK
from probes.files import write_figure
from probes.report import DIFFERENCE_COLUMNS, REPORT, Link, Page, Table, difference_cells, interval, write_report

TARGETS = ("steer_to_context", "steer_to_memory")
STREAMS = {"residual": "residual stream", "attn_out": "attention output", "mlp_out": "MLP output"}


def residual_index(hook_name: str) -> int:
    """Where a residual hook point sits on the probe curve, whose point i is the residual stream after i blocks:
    L for ``blocks.L.hook_resid_pre``, L + 1 for ``blocks.L.hook_resid_post``."""
    layer, kind = RESIDUAL_HOOK.match(hook_name).groups()
    return int(layer) + (kind == "post")


def probe_auroc(results: dict) -> go.Figure:
    """Conflict-probe test AUROC by layer on each stream, with 95% intervals over held-out questions; the SAEs'
    hook points dotted."""
    probe, fig = results["conflict_probe"], go.Figure()
    for stream, label in STREAMS.items():
        entry = probe[stream]
        values = entry["auroc"]
        fig.add_trace(go.Scatter(
            x=list(range(len(values))), y=values, mode="lines+markers", name=label,
            error_y=dict(type="data", symmetric=False,
                         array=[ci[1] - v for ci, v in zip(entry["auroc_ci95"], values, strict=True)],
                         arrayminus=[v - ci[0] for ci, v in zip(entry["auroc_ci95"], values, strict=True)])))
    for hook_name in results["sae_hooks"].values():
        fig.add_vline(x=residual_index(hook_name), line_dash="dot", line_color="grey")
    fig.update_layout(title=f"{results['model']}: does the context conflict with memory? L1 probe, test AUROC "
                            f"({probe['n_groups']} held-out questions; dotted: SAE hook points)",
                      xaxis_title="layer (residual: 0 = embeddings; attention/MLP: block)", yaxis_title="AUROC",
                      yaxis_range=[0.3, 1.02])
    return fig


def _label(results: dict, method: str) -> str:
    m = results["methods"][method]
    return m["label"] + (" *" if m["extra_input"] else "")


def steering_bars(results: dict) -> go.Figure:
    """The paper's Table 1 as bars: exact match toward each target per method, mean over seeds with the sd as
    error bars; * marks methods that see more input than the prompt."""
    fig = make_subplots(rows=1, cols=len(results["exact_match"]), subplot_titles=[
        f"{t.replace('_', ' ')} (n={next(iter(r.values()))['n']} per seed)" for t, r in results["exact_match"].items()])
    for col, rows in enumerate(results["exact_match"].values(), start=1):
        fig.add_trace(go.Bar(x=[_label(results, m) for m in rows], y=[v["mean"] for v in rows.values()],
                             error_y=dict(type="data", array=[v["sd"] for v in rows.values()]), showlegend=False,
                             marker_color=["#bbb" if results["methods"][m]["extra_input"] else
                                           "#d62728" if m == "spare" else "#1f77b4" for m in rows]), 1, col)
    fig.update_yaxes(range=[0, 1.05], title_text="exact match")
    seeds = next(iter(next(iter(results["exact_match"].values())).values()))["seeds"]
    fig.update_layout(title=f"{results['model']}: exact match on held-out conflict prompts, mean ± sd over {seeds} "
                            "seed(s) (grey, *: sees more input than the prompt)")
    return fig


def comparisons(results: dict) -> go.Figure:
    """SpARE minus each other method on the same test prompts (seed-averaged), with 95% paired-bootstrap
    intervals: right of zero, SpARE steers better."""
    fig = go.Figure()
    for target, rows in results["comparisons"].items():
        names = [_label(results, k.removeprefix("spare_vs_")) for k in rows]
        fig.add_trace(go.Scatter(
            y=names, x=[v["difference"] for v in rows.values()], mode="markers", name=target.replace("_", " "),
            error_x=dict(type="data", symmetric=False, array=[v["ci95"][1] - v["difference"] for v in rows.values()],
                         arrayminus=[v["difference"] - v["ci95"][0] for v in rows.values()])))
    fig.add_vline(x=0, line_color="grey")
    fig.update_layout(title="SpARE minus each method, same test prompts (95% paired bootstrap)",
                      xaxis_title="difference of exact match", yaxis_autorange="reversed")
    return fig


def behaviour_changes(results: dict) -> go.Figure:
    """Which behaviours each method changed, summed over seeds: stacked bars of the transitions from the unedited
    behaviour to the steered one."""
    targets = list(results["behaviour_changes"])
    fig = make_subplots(rows=1, cols=len(targets), subplot_titles=[t.replace("_", " ") for t in targets])
    kinds = list(next(iter(results["behaviour_changes"][targets[0]].values())))
    for col, target in enumerate(targets, start=1):
        rows = results["behaviour_changes"][target]
        for kind in kinds:
            if any(r[kind] for r in rows.values()):
                fig.add_trace(go.Bar(x=[_label(results, m) for m in rows], y=[r[kind] for r in rows.values()],
                                     name=kind, legendgroup=kind, showlegend=col == 1), 1, col)
    fig.update_layout(barmode="stack", title="Unedited behaviour -> steered behaviour (test prompts, summed over "
                                             "seeds)", yaxis_title="prompts")
    return fig


def mi_ranking(results: dict, layer: int | str) -> go.Figure:
    """Mutual information of the first seed's selected latents of one layer, coloured by the behaviour they
    favour."""
    latents = results["per_seed"][0]["latents"]
    entry = latents[layer] if layer in latents else latents[str(layer)]
    ids = entry["context"] + entry["memory"]
    colour = ["context"] * len(entry["context"]) + ["memory"] * len(entry["memory"])
    order = sorted(range(len(ids)), key=lambda i: -entry["mi"][i])
    fig = go.Figure([go.Bar(x=[f"#{ids[i]}" for i in order if colour[i] == c],
                            y=[entry["mi"][i] for i in order if colour[i] == c], name=f"favours {c}")
                     for c in ("context", "memory")])
    fig.update_layout(title=f"layer {layer}: selected SAE latents by mutual information with the behaviour (seed 0)",
                      xaxis_title="latent", yaxis_title="MI (nats)", xaxis={"categoryorder": "total descending"})
    return fig


def table_one(results: dict) -> Table:
    """Exact match per method toward each target: mean ± sd over seeds, the seed-mean's Wilson interval, n."""
    targets = list(results["exact_match"])
    rows = []
    for method, info in results["methods"].items():
        cells = []
        for t in targets:
            e = results["exact_match"][t].get(method)
            cells.append(f"{e['mean']:.3f} ± {e['sd']:.3f} {interval(e)}" if e else f"n/a: {info['not_applicable']}")
        rows.append([info["label"], info["extra_input"] or "-", *cells])
    first = results["exact_match"][targets[0]]
    n, seeds = next(iter(first.values()))["n"], next(iter(first.values()))["seeds"]
    return Table("Table 1: exact match on held-out conflict prompts", ["method", "sees beyond the prompt",
                 *[f"{t.replace('_', ' ')}: mean ± sd [95% CI]" for t in targets]], rows,
                 f"n = {n} test prompts per seed, {seeds} seed(s) of demonstrations; the interval is the Wilson "
                 "interval of the seed-mean rate at n. Methods that see more than the prompt are not comparable "
                 "with SpARE on equal terms.")


def report_tables(results: dict) -> list[Table]:
    """Table 1, SpARE against each method on the same prompts, the protocol, the tuned settings per seed, the split
    and behaviour counts, the relation kinds."""
    diffs = Table("SpARE against each method on the same prompts", ["steer toward", "comparison",
                                                                    *DIFFERENCE_COLUMNS],
                  [[t.replace("_", " "), c.replace("_", " "), *difference_cells(e)]
                   for t, rows in results["comparisons"].items() for c, e in rows.items()],
                  "Difference of exact match averaged over seeds per prompt; 95% interval from 2,000 seeded "
                  "resamples of the test prompts.")
    protocol = results["protocol"]
    proto = Table("Protocol", ["", "value"], [["protocol", protocol["name"]],
                  *[[f"differs from the paper: {k}", str(v)] for k, v in protocol["differs_from_paper"].items()]])
    tuned = Table("Settings tuned on validation, per seed", ["seed", "method, target", "setting"],
                  [[s["seed"], k.replace("_", " "), v["label"]] for s in results["per_seed"]
                   for k, v in s["tuning"].items()])
    split = Table("Examples and unedited behaviour", ["seed", "train fitted on", "train behaviour", "test behaviour"],
                  [[s["seed"], s["train_fitted_on"], ", ".join(f"{g} {c}" for g, c in s["train_behaviour"].items()),
                    ", ".join(f"{g} {c}" for g, c in s["test_behaviour"].items())] for s in results["per_seed"]],
                  "Split: " + ", ".join(f"{k} {v}" for k, v in results["n"].items()))
    kinds = results.get("known_facts_kinds", {})
    parts = [p for p in ("all", "train", "val", "test") if p in kinds]
    relations = Table("Relation kinds", ["relation kind", *parts],
                      [[kind.replace("_", " "), *(kinds[p].get(kind, 0) for p in parts)]
                       for kind in kinds.get("all", {})], "Facts of each kind in each split.")
    dashboards = [latent_table(results)] if results.get("latent_dashboards") else []
    return [table_one(results), diffs, proto, tuned, split, *([relations] if parts else []), *dashboards]


def latent_table(results: dict) -> Table:
    """Seed 0's selected latents, each linking its dashboard (top contexts, histogram, logit lens)."""
    rows = [[layer, e["favours"], Link(f"latent {e['latent']}", e["page"]), e["firing_rate"], e["promotes"]]
            for layer, entries in results["latent_dashboards"].items() for e in entries]
    return Table("Selected latents (seed 0) and their dashboards", ["layer", "favours", "dashboard", "firing rate",
                                                                   "decoder row promotes"], rows,
                 f"Read from {results['settings']['dashboard_tokens']:,} tokens of held-out SAE-corpus text (texts "
                 "the SAEs were not trained on).")


def figures(results: dict) -> dict[str, go.Figure]:
    """Every figure of a run, by file stem."""
    figs = {"steering": steering_bars(results), "probe_auroc": probe_auroc(results),
            "behaviour_changes": behaviour_changes(results)}
    if results["comparisons"]:
        figs["comparisons"] = comparisons(results)
    figs.update({f"latents_layer{layer}": mi_ranking(results, layer) for layer in results["spare_layers"]})
    return figs


# The files write_all writes (a run folder's figures and report page, replaced as a whole by the next run).
FIGURE_FILES = ("steering.html", "probe_auroc.html", "behaviour_changes.html", "comparisons.html",
                "latents_layer*.html", REPORT)


def write_all(results: dict, out: Path) -> list[Path]:
    """Every figure as HTML in ``out`` (plotly.js once, beside them) and the report page ``index.html`` showing
    them with the run's settings and numbers, each file atomically."""
    figs = figures(results)
    settings = {**results["settings"], "SAE hook points": results["sae_hooks"]}
    page = Page(f"SpARE and its baselines: {results['model']}", settings, report_tables(results), figs)
    return [*(write_figure(fig, out / f"{name}.html") for name, fig in figs.items()), write_report(out, page)]
