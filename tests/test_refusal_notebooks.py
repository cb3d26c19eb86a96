import json
import re

import pytest
import torch

from probes.errors import WorkbenchError
from steering import refusal
from steering.directions import CandidateDirections
from tests.notebook_runner import figures, run_notebook
from tests.numerics import FLOAT32_REL

SMALL = {"MODEL": "embedded-refuser", "N_TRAIN": 24, "N_VAL": 4, "N_TEST": 3, "LAYER_STEP": 6, "MAX_NEW_TOKENS": 12,
         "OUTLIER_RATIO": 10}


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")


def test_notebook_02_selects_and_saves_then_03_orthogonalizes_it_without_selecting_again(tmp_path):
    run = tmp_path / "refusal"
    nb = run_notebook("02_refusal_direction.ipynb", SMALL | {"OUT": str(run)})
    heatmaps = [f for f in figures(nb) if {t["type"] for t in f["data"]} == {"heatmap"}]
    assert len(heatmaps) == 1 and len(heatmaps[0]["data"]) == 3
    tables = [o for c in nb.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert any("direction ablated" in o["data"]["text/html"] for o in tables)
    assert {p.name for p in run.iterdir()} >= set(refusal.SELECTION_OUTPUTS)

    nb = run_notebook("03_orthogonalize_and_save.ipynb", {"MODEL": "embedded-refuser", "RUN": str(run), "N_TEST": 3,
                                                          "MAX_NEW_TOKENS": 12, "CHECKPOINT": str(tmp_path / "ckpt")})
    assert "diff_in_means" not in "".join(c.source for c in nb.cells)
    text = printed(nb)
    # relative to the largest |logit|: float32 rounding stays far below FLOAT32_REL, a wrong edit far above
    weights_vs_hooks = float(re.search(r"weights vs hooks: [0-9.e+-]+ \(([0-9.e+-]+) of", text).group(1))
    reloaded_vs_edited = float(re.search(r"reloaded vs edited: [0-9.e+-]+ \(([0-9.e+-]+) of", text).group(1))
    assert weights_vs_hooks < FLOAT32_REL and reloaded_vs_edited < FLOAT32_REL
    assert (tmp_path / "ckpt" / "config.json").is_file()


def candidates_for(model) -> tuple[CandidateDirections, list[refusal.CandidateScore]]:
    vectors = torch.randn(2, 2, model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores = [refusal.CandidateScore(p, l, -0.5 * l, 1.0, 0.01, True) for p in (-2, -1) for l in (0, 1)]
    return CandidateDirections(vectors, [-2, -1], [0, 1], 4, 4), scores


def test_a_saved_selection_reads_back_and_is_refused_where_it_does_not_belong(tiny, tmp_path):
    candidates, scores = candidates_for(tiny)
    best = refusal.select(scores)
    refusal.save_selection(tmp_path, tiny, candidates, scores, best)
    direction, loaded = refusal.load_selection(tmp_path, tiny)
    assert loaded == best and direction.dtype == torch.float32
    torch.testing.assert_close(direction.double(), candidates.get(best.position, best.layer), rtol=1e-6, atol=0)
    with pytest.raises(FileExistsError):
        refusal.save_selection(tmp_path, tiny, candidates, scores, best)
    with pytest.raises(WorkbenchError, match="run notebooks/02_refusal_direction.ipynb with OUT"):
        refusal.load_selection(tmp_path / "missing", tiny)
    meta = json.loads((tmp_path / "direction.json").read_text())
    (tmp_path / "direction.json").write_text(json.dumps({**meta, "weights": "other weights"}))
    with pytest.raises(WorkbenchError, match="rerun notebook 02"):
        refusal.load_selection(tmp_path, tiny)
