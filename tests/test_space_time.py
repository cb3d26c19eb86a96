import json

import numpy as np
import pandas as pd
import pytest
import torch

from probes import space_time
from probes.datasets import EntityData
from probes.provenance import weights_fingerprint
from probes.space_time import SpaceTimeSettings
from tests.notebook_runner import figures, run_notebook
from tests.report_checks import check_report

CONTRACT = {"targets", "layers", "r2", "spearman", "best_layer", "best_r2"}


def test_cli_writes_the_contract(embedded, tmp_path, monkeypatch):
    monkeypatch.setattr(space_time, "load_model", lambda *a, **k: embedded)
    space_time.main(["--model", "embedded", "--datasets", "world_place,art", "--n-entities", "120", "--templates",
                     "empty", "--seed", "0", "--mlp-epochs", "2", "--no-variants", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["model"] == "embedded" and results["complete"] is True
    assert results["settings"] == SpaceTimeSettings(datasets=["world_place", "art"], n_entities=120,
                                                    templates=["empty"], mlp_epochs=2, variants=False,
                                                    out=tmp_path).to_dict()
    assert set(results["datasets"]) == {"world_place", "art"}
    assert not (tmp_path / "results.json.tmp").exists()
    for entry in results["datasets"].values():
        assert CONTRACT <= set(entry)
        assert len(entry["r2"]) == len(entry["layers"]) == len(entry["spearman"]) == embedded.n_layers + 1
        assert entry["best_r2"] == pytest.approx(max(entry["r2"]))
        assert entry["best_layer"] == int(np.argmax(entry["r2"]))
        check_peak(entry["peak"], entry["r2"], entry["n_test"])
        assert entry["peak"]["layer"] == entry["best_layer"]
    assert results["datasets"]["world_place"]["targets"] == ["latitude", "longitude"]
    assert (tmp_path / "r2_by_layer.html").is_file() and (tmp_path / "world_place_predictions.html").is_file()
    assert set(results["controls"]) == {"world_place", "art"}
    for curves in results["controls"].values():
        assert set(curves) == {"random_weights", "shuffled_targets"}
        assert all(len(r2) == embedded.n_layers + 1 for r2 in curves.values())
    assert set(results["control_peaks"]) == {"world_place", "art"}
    for name, peaks in results["control_peaks"].items():
        assert set(peaks) == {"random_weights", "shuffled_targets"}
        for control, peak in peaks.items():
            check_peak(peak, results["controls"][name][control], results["datasets"][name]["n_test"])
    assert results["control_model"]["weights_fingerprint"] != weights_fingerprint(embedded)
    r2_figure = (tmp_path / "r2_by_layer.html").read_text()
    assert '"name":"random weights"' in r2_figure and '"name":"shuffled targets"' in r2_figure
    page = check_report(tmp_path)
    assert "<td>n_entities</td><td class=\"num\">120</td>" in page and "<td>neuron_ks</td>" in page
    assert "scikit-learn R²" in page and "world_place" in page and "Controls (peak test R²" in page
    assert "Peak test R² (95% bootstrap interval over test entities)" in page
    for name, entry in results["datasets"].items():
        cells = [entry["peak"], *results["control_peaks"][name].values()]
        row = "".join(f"<td>{c['r2']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]</td>" for c in cells)
        assert f"<tr><td>{name}</td>{row}<td class=\"num\">{entry['n_test']}</td></tr>" in page
    assert draws_shipped_outlines(tmp_path / "world_place_predictions.html")


def check_peak(peak: dict, r2_by_layer: list[float], n_test: int) -> None:
    """A peak entry of results.json: the best layer's test R² (exactly the maximum over the layers) inside its 95%
    bootstrap interval, resampled from the n test entities."""
    low, high = peak["ci95"]
    assert peak["r2"] == max(r2_by_layer) and peak["layer"] == int(np.argmax(r2_by_layer))
    assert low <= peak["r2"] <= high and low < high
    assert peak["n"] == n_test and peak["n_resamples"] == 2000


def planted(n: int = 300, layers: int = 3, d: int = 40, seed: int = 0) -> tuple[torch.Tensor, EntityData]:
    """Synthetic activations [n, layers, d] whose last layer holds two targets linearly, with noise."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(n, layers, d))
    targets = acts[:, -1, :2] @ rng.normal(size=(2, 2)) + 0.1 * rng.normal(size=(n, 2))
    data = EntityData("planted", "space", pd.DataFrame(index=range(n)), [f"e{i}" for i in range(n)], targets,
                      ["a", "b"], rng.random(n) < 0.3)
    return torch.as_tensor(acts), data


def test_shuffled_targets_leave_the_probe_nothing_to_read():
    acts, data = planted()
    shuffled = space_time.shuffled_targets(data, seed=1)
    assert np.array_equal(np.sort(shuffled.targets, 0), np.sort(data.targets, 0))
    assert np.array_equal(shuffled.is_test, data.is_test) and shuffled.entities == data.entities
    assert np.array_equal(space_time.shuffled_targets(data, seed=1).targets, shuffled.targets)
    assert space_time.fit_layers(acts, data).r2[-1] > 0.95
    assert max(space_time.fit_layers(acts, shuffled).r2) < 0.05


def draws_shipped_outlines(path) -> bool:
    """The map's figure file draws the shipped country outlines (a line trace; check_report: no topojson)."""
    return '"name":"country outlines"' in path.read_text()


def test_place_probe_improves_from_embeddings_to_middle_layers_and_matches_sklearn(embedded):
    settings = SpaceTimeSettings(datasets=["world_place"], n_entities=400, templates=["empty"], n_blocks=2,
                                 neuron_ks=[1, 8], controls=False, mlp=False, prompt_transfer=False)
    results, _ = space_time.reproduce(embedded, settings, progress=False)
    assert "controls" not in results
    entry = results["datasets"]["world_place"]
    middle = entry["r2"][embedded.n_layers // 4: 3 * embedded.n_layers // 4]
    assert max(middle) > entry["r2"][0] + 0.05
    assert abs(entry["best_r2"] - entry["sklearn_ridgecv_r2_at_best_layer"]) < 1e-3
    assert entry["heldout_blocks"] and entry["median_error_km"] > 0
    assert set(entry["neurons"]["r2_top_k"]) == {"1", "8", str(embedded.hf_model.config.intermediate_size)}


def test_unknown_dataset_or_template():
    with pytest.raises(ValueError, match="unknown dataset"):
        SpaceTimeSettings(datasets=["mars_place"])
    with pytest.raises(ValueError, match="unknown template"):
        SpaceTimeSettings(datasets=["art"], templates=["poem"])


def test_notebook_runs_and_shows_the_figures(tmp_path):
    nb = run_notebook("01_space_time.ipynb", {"N_ENTITIES": 60, "TEMPLATES": ["empty"], "MLP_EPOCHS": 2,
                                              "OUT": str(tmp_path / "nb")})
    figs = figures(nb)
    kinds = [{t["type"] for t in f["data"]} for f in figs]
    assert len(figs) >= 8
    r2_fig = figs[0]
    names = [t["name"] for t in r2_fig["data"]]
    assert [n for n in names if n in space_time.ALL_DATASETS] == list(space_time.ALL_DATASETS)
    assert names.count("random weights") == names.count("shuffled targets") == len(space_time.ALL_DATASETS)
    assert sum(any(t.get("name") == "predicted" for t in f["data"]) for f in figs) == 3  # world, US and NYC maps
    assert any(k == {"bar"} for k in kinds)  # held-out blocks
    assert (tmp_path / "nb" / "headline_predictions.html").is_file()
    results = json.loads((tmp_path / "nb" / "results.json").read_text())  # a run folder, as the CLI writes it
    assert results["complete"] and results["settings"]["n_entities"] == 60 and results["templates"] == ["empty"]
    side_by_side = [m["name"] for m in results["models_side_by_side"]["models"]]  # the three offline models
    assert side_by_side == ["embedded", "embedded-refuser", "random-weights:embedded"]
    assert sum(t["type"] == "heatmap" for f in figs for t in f["data"]) >= 2 * len(space_time.ALL_DATASETS)
    assert "<td>n_entities</td>" in check_report(tmp_path / "nb")
