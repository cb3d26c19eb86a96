"""Drawing latent dashboards (:mod:`steering.latent_dashboard`): one HTML panel per latent that opens offline (plain
HTML and inline styles, no script), a plotly figure of the same numbers, and a report page per latent."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.direction_lens import lens_rows
from probes.files import atomic_write_text
from probes.report import STYLE

if TYPE_CHECKING:
    from steering.latent_dashboard import Context, LatentSummary

PANEL_STYLE = """.wb-latent{font-family:system-ui,sans-serif;font-size:13px;color:#222}
.wb-latent .row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start;margin:.5em 0 1em}
.wb-latent table{border-collapse:collapse}.wb-latent td{padding:1px 6px;border-bottom:1px solid #eee}
.wb-latent .num{text-align:right;font-variant-numeric:tabular-nums}.wb-latent .ctx{white-space:pre-wrap}"""


@dataclass
class Panel:
    """A latent's dashboard as HTML: a notebook shows it, ``str()`` gives the HTML."""

    html: str = field(repr=False)

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html


def _histogram_html(summary: LatentSummary, height: int = 90) -> str:
    """Bars of the non-zero activations' histogram as plain divs, each with its range and count on hover."""
    peak = max(summary.counts) or 1
    bars = "".join(
        f'<div title="[{lo:.3g}, {hi:.3g}): {n}" style="width:7px;height:{100 * n / peak:.1f}%;'
        f'background:#e8772e;min-height:{1 if n else 0}px"></div>'
        for lo, hi, n in zip(summary.edges, summary.edges[1:], summary.counts, strict=False))
    return (f'<div style="display:flex;align-items:flex-end;gap:1px;height:{height}px;'
            f'border-bottom:1px solid #999">{bars}</div><div style="display:flex;justify-content:space-between">'
            f"<span>{summary.edges[0]:.3g}</span><span>{summary.edges[-1]:.3g}</span></div>")


def _tokens_table(title: str, rows: list[tuple[str, float]]) -> str:
    cells = "".join(f'<tr><td class="ctx">{html.escape(repr(t))}</td><td class="num">{v:+.3g}</td></tr>'
                    for t, v in rows)
    return f"<div><b>{html.escape(title)}</b><table>{cells}</table></div>"


def _context_html(context: Context, top: float) -> str:
    """The context's tokens shaded by the latent's activation (relative to its highest), the peak outlined."""
    spans = []
    for i, (token, act) in enumerate(zip(context.tokens, context.acts, strict=True)):
        alpha = max(0.0, min(1.0, act / top)) if top > 0 else 0.0
        outline = "outline:1px solid #b34700;" if i == context.peak else ""
        spans.append(f'<span title="{act:.3g}" style="background:rgba(232,119,46,{alpha:.2f});{outline}">'
                     f"{html.escape(token)}</span>")
    return (f'<tr><td class="num">{context.acts[context.peak]:.3g}</td>'
            f'<td class="ctx">{"".join(spans)}</td></tr>')


def panel_html(summary: LatentSummary) -> str:
    """The dashboard's HTML: header numbers, histogram, logit lens, top contexts."""
    s = summary
    head = (f"<h3>Latent {s.latent} of {s.d_sae} &middot; {html.escape(s.hook_name)}</h3>"
            f"<p>fires on {100 * s.firing_rate:.3g}% of {s.n_tokens:,} tokens ({s.n_firing:,}); highest activation "
            f"{s.max_activation:.3g}</p>")
    hist = (f"<div><b>Activation when firing</b>{_histogram_html(s)}</div>" if s.n_firing
            else "<div><b>Never fires on this corpus</b></div>")
    lens = _tokens_table("Decoder row promotes", s.lens.promoted) + _tokens_table("and suppresses", s.lens.suppressed)
    rows = "".join(_context_html(c, s.max_activation) for c in s.contexts)
    contexts = (f"<b>Top contexts</b> (shaded by activation; hover a token for its value)<table>{rows}</table>"
                if rows else "")
    return (f'<div class="wb-latent"><style>{PANEL_STYLE}</style>{head}<div class="row">{hist}{lens}</div>'
            f"{contexts}</div>")


def panel(summary: LatentSummary) -> Panel:
    """The dashboard of one latent, for a notebook or a page."""
    return Panel(panel_html(summary))


def figure(summary: LatentSummary) -> go.Figure:
    """The histogram of the latent's non-zero activations beside its decoder row's logit lens."""
    s = summary
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("activation when firing", "logit lens of the decoder row"))
    centres = [(a + b) / 2 for a, b in zip(s.edges, s.edges[1:], strict=False)]
    fig.add_trace(go.Bar(x=centres, y=s.counts, width=s.edges[1] - s.edges[0], marker_color="#e8772e",
                         name="tokens"), 1, 1)
    labels, values = lens_rows(s.lens)
    fig.add_trace(go.Bar(x=values, y=labels, orientation="h", name="logit",
                         marker_color=["#2a7" if v > 0 else "#c33" for v in values]), 1, 2)
    fig.update_layout(title=f"Latent {s.latent} ({s.hook_name}): fires on {100 * s.firing_rate:.3g}% of "
                            f"{s.n_tokens:,} tokens", showlegend=False, height=max(380, 20 * len(labels) + 140))
    fig.update_xaxes(title_text="activation", row=1, col=1)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    return fig


def write_page(summary: LatentSummary, path: str | Path) -> Path:
    """The dashboard as a standalone HTML page at ``path`` (written atomically; no script, opens offline)."""
    title = html.escape(f"Latent {summary.latent} ({summary.hook_name})")
    return atomic_write_text(path, f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
                                   f"<style>{STYLE}</style></head><body>{panel_html(summary)}</body></html>\n")
