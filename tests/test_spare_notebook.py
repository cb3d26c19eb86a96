"""Notebook 04 runs the comparison on the embedded model with its shipped SAEs and shows Table 1, the bars, SpARE
against each method, the behaviour changes, the probe curves and the latent ranking."""

import json

from tests.notebook_runner import figures, run_notebook


def test_spare_notebook_shows_the_comparison(tmp_path):
    nb = run_notebook("04_spare.ipynb", {
        "N_EXAMPLES": 40, "N_SEEDS": 1, "TUNE_N": 4, "STRENGTHS": [1.0], "CAD_ALPHAS": [1.0],
        "DOLA_BUCKETS": ["high"], "TASKVEC_LAYERS": [12], "SEA_KEEP": [0.9], "MAX_NEW_TOKENS": 4,
        "DASHBOARD_TOKENS": 2000, "OUT": str(tmp_path / "spare")})
    figs = figures(nb)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert any("mean ± sd over 1 seed" in t for t in titles)
    assert any(t.startswith("SpARE minus each method") for t in titles)
    assert any("L1 probe, test AUROC" in t for t in titles)
    bars = next(f for f in figs if "mean ± sd" in f["layout"]["title"]["text"])
    assert {"SpARE", "CAD *", "ICL *", "DoLa", "SEA (linear)"} <= {x for t in bars["data"] for x in t["x"]}
    saved = json.loads((tmp_path / "spare" / "results.json").read_text())
    assert saved["settings"]["n_examples"] == 40 and saved["settings"]["n_seeds"] == 1
    assert saved["protocol"]["differs_from_paper"] == {"n_seeds": 1}
    tables = [o["data"]["text/html"] for c in nb.cells for o in c.get("outputs", [])
              if "text/html" in o.get("data", {})]
    assert any("Table 1" in t for t in tables) and any("spare_to_memory" in t for t in tables)
    assert any("Top contexts" in t for t in tables)  # a latent dashboard (at these sizes, often one behaviour's only)
    pages = [e["page"] for entries in saved["latent_dashboards"].values() for e in entries]
    report = (tmp_path / "spare" / "index.html").read_text()
    assert pages and all((tmp_path / "spare" / p).is_file() and f'href="{p}"' in report for p in pages)
