"""One HTML report page per run (``OUT/index.html``: settings, key numbers as tables, every figure) and an index of
several runs, both opening offline from the file system.

    python -m probes.report --index runs/demo     # runs/demo/index.html, linking each sub-folder's report

Figures are embedded as plotly divs that load the run folder's one ``plotly.min.js`` (written by
:func:`probes.files.write_plotlyjs`); nothing is fetched from the network. Experiments build their tables from their
results dict and call :func:`write_report`; this module only knows the results.json contracts (docs/results.md),
never the experiments' code (``probes`` does not import ``steering``).
"""

from __future__ import annotations

import html
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from probes.cli_args import ArgumentParser, run_cli
from probes.errors import WorkbenchError
from probes.files import atomic_write_text, write_plotlyjs
from probes.readers import read_json

REPORT = "index.html"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figure{margin:1em 0 2em}.note{color:#555;font-size:.9em}h2{margin-top:1.5em}"""


@dataclass
class Table:
    """A titled table; cells are text or numbers (formatted by :func:`fmt`). ``link`` makes the title a link."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""
    link: str = ""

    def __post_init__(self):
        if self.link and not _safe_link(self.link):
            raise WorkbenchError(f"table link {self.link!r} refused: a report links only to relative paths and "
                                 "http(s) addresses")

    def _repr_html_(self) -> str:
        """A notebook shows the table as the report page does."""
        return table_html(self)


def _safe_link(link: str) -> bool:
    """A relative path (no scheme, not protocol-relative) or an http(s) address: nothing a page would run."""
    parts = urllib.parse.urlsplit(link.strip())
    if parts.scheme:
        return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
    return not link.strip().startswith("//") and not any(ord(c) < 32 for c in link)


@dataclass(frozen=True)
class Link:
    """A table cell shown as ``text`` that links ``href`` (a relative path or an http(s) address)."""

    text: str
    href: str

    def __post_init__(self):
        if not _safe_link(self.href):
            raise WorkbenchError(f"link {self.href!r} refused: a report links only to relative paths and http(s) "
                                 "addresses")


@dataclass
class Page:
    """What a report page shows: title, settings (shown as a table), tables and named plotly figures."""

    title: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    tables: Sequence[Table] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)


def fmt(value: Any) -> str:
    """A cell's text: floats with 3 decimals (3 significant digits when large or tiny), lists joined, rest str."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3) else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def interval(entry: Mapping[str, Any], key: str = "ci95") -> str:
    """``[low, high]`` of a rate or difference entry (see :func:`probes.metrics.rate_with_interval`)."""
    low, high = entry[key]
    return f"[{low:.3f}, {high:.3f}]"


def rate_cells(entry: Mapping[str, Any]) -> list[Any]:
    """Rate, n and 95% interval cells of a :func:`probes.metrics.rate_with_interval` entry."""
    return [entry["rate"], entry["n"], interval(entry)]


def difference_cells(entry: Mapping[str, Any]) -> list[Any]:
    """Difference, 95% interval and verdict cells of a :func:`probes.metrics.paired_bootstrap` entry."""
    verdict = "yes" if entry["excludes_zero"] else "no (within the noise)"
    return [f"{entry['difference']:+.3f}", interval(entry), entry["n"], verdict]


RATE_COLUMNS = ["rate", "n", "95% CI (Wilson)"]
DIFFERENCE_COLUMNS = ["difference", "95% CI (paired bootstrap)", "n prompts", "larger than the noise"]


def _cell_html(cell: Any) -> str:
    if isinstance(cell, Link):
        return f'<td><a href="{html.escape(cell.href)}">{html.escape(cell.text)}</a></td>'
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return f'<td class="num">{html.escape(fmt(cell))}</td>'
    return f"<td>{html.escape(fmt(cell))}</td>"


def table_html(table: Table) -> str:
    """One table with its heading and note, every text escaped."""
    title = html.escape(table.title)
    if table.link:
        title = f'<a href="{html.escape(table.link)}">{title}</a>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>\n" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<h2>{title}</h2>\n<table><tr>{head}</tr>\n{body}</table>{note}\n"


def figure_html(name: str, fig) -> str:
    """A plotly figure as a div (no plotly.js in it: the page loads it once)."""
    height = f"{fig.layout.height or 480}px"
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{name}", default_height=height)
    return f'<div class="figure">{div}</div>\n'


def render(page: Page) -> str:
    """The whole HTML page; plotly.js is loaded from ``plotly.min.js`` beside it only when there are figures."""
    settings = Table("Settings", ["setting", "value"], [[k, v] for k, v in page.settings.items()])
    script = '<script src="plotly.min.js"></script>' if page.figures else ""
    parts = [table_html(settings)] if page.settings else []
    parts += [table_html(t) for t in page.tables]
    if page.figures:
        parts.append("<h2>Figures</h2>\n" + "".join(figure_html(n, f) for n, f in page.figures.items()))
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(page.title)}</title>\n'
            f"<style>{STYLE}</style>{script}</head>\n<body><h1>{html.escape(page.title)}</h1>\n"
            + "".join(parts) + "</body></html>\n")


def write_report(out: str | Path, page: Page) -> Path:
    """``out/index.html`` (and ``out/plotly.min.js`` if the page has figures), written atomically."""
    out = Path(out)
    if page.figures:
        write_plotlyjs(out)
    return atomic_write_text(out / REPORT, render(page))


def _extract_headline(r: dict) -> list[list[Any]]:
    return [["prompts", r["n_prompts"]], ["activations shape", "x".join(map(str, r["shape"]))],
            ["prompts per second", r["prompts_per_second"]]]


def _space_time_headline(r: dict) -> list[list[Any]]:
    return [[f"{name}: test R² (best layer {e['best_layer']})", e["best_r2"]] for name, e in r["datasets"].items()]


def _refusal_headline(r: dict) -> list[list[Any]]:
    rates = r.get("refusal_rate", {})
    return [[f"refusal rate, {k.replace('_', ' ')}",
             f"{v:.3f} {interval(rates[k])} n={rates[k]['n']}" if k in rates else v]
            for k, v in r["refusal_score"].items()]


def _spare_headline(r: dict) -> list[list[Any]]:
    rows = []
    for target in ("steer_to_context", "steer_to_memory"):
        ems = r.get("exact_match", {}).get(target, {})
        rows += [[f"exact match {target.replace('_', ' ')}, {m}",
                  f"{v:.3f} ± {ems[m]['sd']:.3f} over {ems[m]['seeds']} seed(s) {interval(ems[m])} n={ems[m]['n']}"
                  if m in ems else v] for m, v in r[target].items()]
    return rows


# How to recognise each experiment's results.json by its contract keys (docs/results.md), and its headline numbers.
HEADLINES = (("refusal_score", "steering.refusal", _refusal_headline),
             ("steer_to_context", "steering.spare", _spare_headline),
             ("datasets", "probes.space_time", _space_time_headline),
             ("shape", "probes.extract", _extract_headline))


def headline(results: dict) -> tuple[str, list[list[Any]]]:
    """The experiment that wrote ``results`` and its headline rows ([label, value])."""
    for key, experiment, rows in HEADLINES:
        if key in results:
            return experiment, rows(results)
    return "unknown experiment", []


def write_index(folder: str | Path) -> Path:
    """``folder/index.html`` linking every sub-folder that holds a results.json (in the order they were written),
    with its headline numbers."""
    folder = Path(folder)
    tables = []
    for path in sorted(folder.glob("*/results.json"), key=lambda p: p.stat().st_mtime):  # in the order they ran
        experiment, rows = headline(read_json(path, "rerun that experiment into its folder with --overwrite"))
        report = path.parent / REPORT
        tables.append(Table(f"{path.parent.name} ({experiment})", ["", "value"], rows,
                            link=f"{path.parent.name}/{REPORT}" if report.is_file() else ""))
    if not tables:
        raise FileNotFoundError(f"no sub-folder of {folder} holds a results.json")
    return write_report(folder, Page(f"Runs in {folder}", tables=tables))


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--index", type=Path, required=True, help="a folder of run folders, e.g. runs/demo")
    path = write_index(parser.parse_args(argv).index)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
