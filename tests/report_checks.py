"""Checks of a run folder's report page (``OUT/index.html``), shared by the experiments' pipeline tests."""

from __future__ import annotations

import re
from pathlib import Path


def check_report(folder: Path, extra_figures: tuple[str, ...] = ()) -> str:
    """The page exists, loads the folder's one plotly.js once, nothing from the network, and shows every figure
    file of the folder (plus ``extra_figures``, shown only on the page) as a div. Returns the page's text."""
    page = (folder / "index.html").read_text()
    assert (folder / "plotly.min.js").is_file()
    assert page.count("<script src=\"plotly.min.js\"></script>") == 1
    assert page.count("plotly.min.js") == 1  # no figure brings its own copy or reference
    assert not re.search(r"<script[^>]+src=\"https?://", page)
    assert "cdn.plot.ly" not in page and "topojson" not in page.lower()
    figures = sorted(p.stem for p in folder.glob("*.html") if p.name != "index.html")
    for name in [*figures, *extra_figures]:
        assert f'id="figure-{name}"' in page, name
    for path in folder.glob("*.html"):  # the figure files are offline too
        text = path.read_text()
        assert "cdn.plot.ly" not in text and "topojson" not in text.lower(), path.name
    return page


def check_rate(entry: dict) -> None:
    """A rate entry of results.json: rate, successes, n and a 95% interval around the rate."""
    assert set(entry) == {"rate", "successes", "n", "ci95"}
    low, high = entry["ci95"]
    assert 0 <= low <= entry["rate"] <= high <= 1 and entry["n"] > 0
    assert entry["rate"] == entry["successes"] / entry["n"]


def check_comparison(entry: dict) -> None:
    """A paired-bootstrap entry of results.json: the difference inside its 95% interval, and the verdict."""
    low, high = entry["ci95"]
    assert low <= entry["difference"] <= high and entry["n"] > 0
    assert entry["excludes_zero"] == (low > 0 or high < 0)
