"""Report pages, intervals and offline figures: Wilson intervals against a reference, the paired bootstrap on
constructed cases, the page builder, the index of runs, offline maps and the selection heatmaps' layout."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from probes import extract, report, space_time_plots
from probes.metrics import paired_bootstrap, rate_with_interval, wilson_interval
from steering.refusal import CandidateScore
from steering.refusal_plots import selection_heatmaps
from tests.report_checks import check_rate, check_report

# (successes, n) -> Wilson 95% interval, from statsmodels' proportion_confint(method="wilson") (0.15.0)
WILSON = {(0, 16): (0.0, 0.19360768053443655), (5, 10): (0.23659309051256394, 0.7634069094874361),
          (74, 91): (0.7210405380450771, 0.8799624485049649), (16, 16): (0.8063923194655633, 1.0),
          (1, 3): (0.06149194472039606, 0.7923403991979523)}


@pytest.mark.parametrize("case", sorted(WILSON))
def test_wilson_interval_matches_statsmodels(case):
    assert wilson_interval(*case) == pytest.approx(WILSON[case], abs=1e-12)
    stats = pytest.importorskip("statsmodels.stats.proportion")
    assert wilson_interval(*case) == pytest.approx(stats.proportion_confint(*case, method="wilson"), abs=1e-12)


def test_wilson_interval_refuses_impossible_counts():
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rate_with_interval_carries_its_n():
    entry = rate_with_interval([True, False, True, True])
    check_rate(entry)
    assert entry["n"] == 4 and entry["successes"] == 3 and entry["ci95"] == list(wilson_interval(3, 4))


def test_paired_bootstrap_is_seeded_and_tells_noise_from_a_difference():
    a = [1, 0] * 20
    same = paired_bootstrap(a, a)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["excludes_zero"]
    b = [0, 1] * 10 + [1, 0] * 10  # disagree on half the prompts, equally often either way
    noisy = paired_bootstrap(a, b)
    assert noisy == paired_bootstrap(a, b)  # deterministic
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and not noisy["excludes_zero"]
    assert paired_bootstrap(a, b, seed=1)["ci95"] != noisy["ci95"]
    two_prompts = paired_bootstrap([1] * 10 + [0] * 6, [1] * 8 + [0] * 8)  # +2 of 16 prompts: within the noise
    assert two_prompts["difference"] == pytest.approx(2 / 16) and not two_prompts["excludes_zero"]
    clear = paired_bootstrap([1] * 18 + [0] * 2, [0] * 18 + [1] * 2)
    assert clear["difference"] == pytest.approx(0.8) and clear["excludes_zero"] and clear["ci95"][0] >= 0.5
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_page_escapes_text_and_loads_plotly_once(tmp_path):
    figs = {"a": go.Figure(go.Bar(x=[1], y=[2])), "b": go.Figure(go.Scatter(x=[1], y=[2]))}
    page = report.Page("<b>title</b>", {"model": "m<x>"},
                       [report.Table("T & U", ["col"], [["<script>alert(1)</script>"], [0.12345]])], figs)
    report.write_report(tmp_path, page)
    text = check_report(tmp_path, extra_figures=("a", "b"))
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;title&lt;/b&gt;" in text and "T &amp; U" in text and "0.123" in text


def test_index_links_the_runs_with_their_headline_numbers(tmp_path):
    refusal = {"refusal_score": {"harmful_baseline": 0.75}, "refusal_rate": {
        "harmful_baseline": rate_with_interval([1, 1, 1, 0])}}
    space = {"datasets": {"world_place": {"best_layer": 3, "best_r2": 0.5}}}
    for name, results in [("space_time", space), ("refusal", refusal)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "refusal" / "index.html").write_text("")
    text = (report.main(["--index", str(tmp_path)])).read_text()
    assert '<a href="refusal/index.html">refusal (steering.refusal)</a>' in text
    assert "space_time (probes.space_time)" in text and 'href="space_time/' not in text  # no page there
    assert "0.750 [0.301, 0.954] n=4" in text and "world_place: test R² (best layer 3)" in text
    assert "plotly.min.js" not in text  # no figures on the index


def test_extract_writes_a_report_page(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Eiffel Tower is in\nTokyo is the capital of\n")
    extract.main(["--model", "random:llama-tiny", "--prompts-file", str(prompts), "--out", str(tmp_path / "x")])
    text = check_report(tmp_path / "x", extra_figures=("mean_norm_by_layer",))
    assert "random:llama-tiny" in text and "prompts per second" in text


class _Run:
    dataset, best_layer, best_r2 = "world_place", 3, 0.5
    truth = np.array([[48.9, 2.3], [35.7, 139.7], [40.7, -74.0]])
    predictions = truth + 1.0


@pytest.mark.parametrize("scope", ["world", "usa", "nyc"])
def test_maps_draw_shipped_outlines_without_geo_traces(scope):
    fig = space_time_plots.place_map(_Run(), scope)
    assert not any(t.type.endswith("geo") for t in fig.data)  # geo traces fetch outlines from a CDN
    names = [t.name for t in fig.data]
    assert (space_time_plots.OUTLINES in names) == (scope != "nyc")
    if scope == "nyc":
        assert "no outlines" in fig.layout.annotations[0].text
    else:
        outline = fig.data[names.index(space_time_plots.OUTLINES)]
        assert len(outline.x) > 10_000 and -180 <= min(x for x in outline.x if x is not None)
    assert fig.layout.yaxis.scaleanchor == "x"
    assert space_time_plots.OUTLINES_FILE.stat().st_size < 400_000


def test_selection_heatmap_colour_bars_sit_between_the_panels():
    scores = [CandidateScore(p, layer, 0.1 * layer, -0.1 * layer, 0.01 * layer, True)
              for p in (-2, -1) for layer in range(0, 12, 3)]
    fig = selection_heatmaps(scores)
    domains = [fig.layout[f"xaxis{i if i > 1 else ''}"].domain for i in (1, 2, 3)]
    for i, trace in enumerate(fig.data):
        assert trace.colorbar.x >= domains[i][1] and trace.colorbar.xanchor == "left"
        if i < 2:  # bar and tick labels (~6% of the width) end before the next panel starts
            assert trace.colorbar.x + 0.06 <= domains[i + 1][0]
    assert fig.layout.yaxis.title.text == "position" and not fig.layout.yaxis2.title.text


@pytest.mark.parametrize("link", ["javascript:alert(1)", " JavaScript:alert(1)", "data:text/html,x", "//evil.example/x",
                                  "vbscript:x", "http:no-host", "a\nb"])
def test_a_table_link_that_could_run_code_or_leave_the_site_unasked_is_refused(link):
    with pytest.raises(ValueError, match="relative paths and http"):
        report.Table("runs", ["run"], [], link=link)


@pytest.mark.parametrize("link", ["refusal/index.html", "../demo/index.html", "https://arxiv.org/abs/2406.11717"])
def test_relative_and_http_links_are_written_escaped(link):
    assert f'href="{link}"' in report.table_html(report.Table("runs", ["run"], [], link=link))
