"""Notebook 04 runs on the embedded model with its shipped SAEs and shows the probe curve, the steering bars and the
latent ranking."""

import json

from tests.notebook_runner import figures, run_notebook


def test_spare_notebook_shows_probe_steering_and_latents(tmp_path):
    nb = run_notebook("04_spare.ipynb", {"N_EXAMPLES": 40, "STRENGTHS": [1.0], "MAX_NEW_TOKENS": 4,
                                          "OUT": str(tmp_path / "spare")})
    kinds = [sorted({t["type"] for t in f["data"]}) for f in figures(nb)]
    assert kinds.count(["scatter"]) == 1 and kinds.count(["bar"]) == 2
    bars = [f for f in figures(nb) if f["data"][0]["type"] == "bar"]
    assert any({t["name"] for t in f["data"]} == {"no_edit", "actadd", "spare"} for f in bars)
    settings = json.loads((tmp_path / "spare" / "results.json").read_text())["settings"]
    assert settings["n_examples"] == 40 and settings["strengths"] == [1.0] and settings["proportion"] == 0.01
    tables = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("SpARE to memory" in o["data"]["text/html"] for o in tables)
