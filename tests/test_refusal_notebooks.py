import json
import re

from steering import refusal
from tests.notebook_runner import figures, run_notebook
from tests.numerics import FLOAT32_REL

SMALL = {"N_TRAIN": 24, "N_VAL": 4, "N_TEST": 3, "LAYER_STEP": 6, "MAX_NEW_TOKENS": 12,
         "N_GENERAL": 4}  # the notebooks' model


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")


def test_notebook_02_selects_and_saves_then_03_orthogonalizes_it_without_selecting_again(tmp_path):
    run = tmp_path / "refusal"
    nb = run_notebook("02_refusal_direction.ipynb", SMALL | {"OUT": str(run)})
    heatmaps = [f for f in figures(nb) if {t["type"] for t in f["data"]} == {"heatmap"}]
    # the selection's, the candidates' cosines, then the direction lens's projections
    assert len(heatmaps) == 3 and len(heatmaps[0]["data"]) == 3 and len(heatmaps[2]["data"]) == 3
    titles = [f["layout"]["title"]["text"] for f in figures(nb)]
    assert any(t.startswith("Logit lens of the refusal direction") for t in titles)
    assert any(t.startswith("Refusal after ablation vs KL") for t in titles)
    assert "Where the direction is expressed" in titles
    assert any("Loss on general text" in "".join(c.source) or "loss_summary" in c.source for c in nb.cells)
    tables = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("direction ablated" in o["data"]["text/html"] for o in tables)
    assert {p.name for p in run.iterdir()} >= set(refusal.SELECTION_OUTPUTS)
    source = "".join(c.source for c in nb.cells)
    assert "refusal.candidate_directions(" in source and "diff_in_means" not in source  # the steps, not a copy
    assert json.loads((run / "direction.json").read_text())["n_positive"] == SMALL["N_TRAIN"]  # the override won

    nb = run_notebook("03_orthogonalize_and_save.ipynb", {"RUN": str(run), "N_TEST": 3, "MAX_NEW_TOKENS": 12,
                                                          "CHECKPOINT": str(tmp_path / "ckpt")})
    assert "diff_in_means" not in "".join(c.source for c in nb.cells)
    text = printed(nb)
    # relative to the largest |logit|: float32 rounding stays far below FLOAT32_REL, a wrong edit far above
    weights_vs_hooks = float(re.search(r"weights vs hooks: [0-9.e+-]+ \(([0-9.e+-]+) of", text).group(1))
    reloaded_vs_edited = float(re.search(r"reloaded vs edited: [0-9.e+-]+ \(([0-9.e+-]+) of", text).group(1))
    assert weights_vs_hooks < FLOAT32_REL and reloaded_vs_edited < FLOAT32_REL
    assert (tmp_path / "ckpt" / "config.json").is_file()
