"""The comparisons behind the space and time paper's claims: the MLP and PCA probes against scikit-learn, the
transfer matrix on a case where it is known, held-out blocks and entity types, neurons by their weights, prompt
variants, models side by side and the wiring into the space and time run."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score as sk_r2
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from probes import space_time
from probes import space_time_analyses as an
from probes import space_time_plots as plots
from probes.architecture import mlp_neuron_weights
from probes.datasets import EntityData
from probes.linear import DEFAULT_ALPHAS
from probes.mlp_probe import MLPProbe
from probes.pca_probe import PCAProbe
from probes.space_time import SpaceTimeSettings
from probes.space_time_models import RANDOM_TWIN, models_side_by_side, resolve_models


def entity_data(targets: np.ndarray, is_test: np.ndarray, frame: pd.DataFrame | None = None,
                kind: str = "space") -> EntityData:
    n = len(targets)
    names = ["latitude", "longitude"] if targets.shape[1] == 2 else ["year"]
    return EntityData("planted", kind, frame if frame is not None else pd.DataFrame(index=range(n)),
                      [f"e{i}" for i in range(n)], targets, names, is_test)


def test_mlp_probe_matches_sklearn_mlp_regressor_on_a_nonlinear_target():
    rng = np.random.default_rng(0)
    n, d = 1200, 8
    x = rng.normal(size=(n, 2, d))  # layer 0: noise; layer 1 holds the target nonlinearly
    z = x[:, 1]
    y = np.sin(2 * z[:, 0]) + z[:, 1] * z[:, 2] + 0.5 * z[:, 3] ** 2 + 0.2 * rng.normal(size=n)
    train, test = slice(0, 960), slice(960, None)
    probe = MLPProbe(weight_decays=(0.01, 0.1), epochs=150, patience=10, batch_size=64, seed=0)
    ours = probe.fit(torch.as_tensor(x[train]), y[train]).score(torch.as_tensor(x[test]), y[test])
    # scikit-learn: Adam with an L2 penalty (not AdamW's decoupled decay), the same width, batches and early stopping
    scaler = StandardScaler().fit(z[train])
    mu, sd = y[train].mean(), y[train].std()
    reference = MLPRegressor(hidden_layer_sizes=(256,), alpha=1e-4, batch_size=64, learning_rate_init=1e-3,
                             max_iter=150, early_stopping=True, n_iter_no_change=10, random_state=0)
    reference.fit(scaler.transform(z[train]), (y[train] - mu) / sd)
    theirs = sk_r2(y[test], reference.predict(scaler.transform(z[test])) * sd + mu)
    assert theirs > 0.85 and abs(float(ours[1]) - theirs) < 0.02
    assert float(ours[0]) < 0.05  # nothing to read in the noise layer
    assert probe.weight_decay_.shape == (2,) and set(probe.weight_decay_) <= {0.01, 0.1}
    assert probe.val_mse_.shape == (2, 2) and probe.w1_.shape == (2, d, 256)


def test_mlp_probe_is_seeded():
    rng = np.random.default_rng(1)
    x, y = torch.as_tensor(rng.normal(size=(200, 3, 6))), rng.normal(size=(200, 2))
    first = MLPProbe(hidden=16, epochs=3, seed=3).fit(x, y).predict(x)
    again = MLPProbe(hidden=16, epochs=3, seed=3).fit(x, y).predict(x)
    other = MLPProbe(hidden=16, epochs=3, seed=4).fit(x, y).predict(x)
    assert first.shape == (3, 200, 2) and torch.equal(first, again) and not torch.equal(first, other)
    single = MLPProbe(hidden=16, epochs=3).fit(x[:, 0], y[:, 0])
    assert single.predict(x[:, 0]).shape == (200,) and isinstance(single.weight_decay_, float)


def test_pca_probe_matches_sklearn_pca_plus_ridge():
    rng = np.random.default_rng(0)
    n, d = 300, 30
    latent = rng.normal(size=(n, 3))
    x = rng.normal(size=(n, 2, d)) * np.linspace(3, 0.3, d) + (latent @ rng.normal(size=(3, d)))[:, None]
    y = latent[:, :2] + 0.1 * rng.normal(size=(n, 2))
    train, test = slice(0, 240), slice(240, None)
    probe = PCAProbe(ks=(1, 5, 50), alphas=DEFAULT_ALPHAS).fit(torch.as_tensor(x[train]), y[train])
    assert probe.ks_ == [1, 5, 30]  # 50 > d is dropped, d is added
    pred = probe.predict(torch.as_tensor(x[test]))
    assert pred.shape == (3, 2, 60, 2)
    mu, sd = y[train].mean(0), y[train].std(0)
    for i, k in enumerate(probe.ks_):
        for layer in range(2):
            pca = PCA(n_components=k, svd_solver="full").fit(x[train, layer])
            ridge = RidgeCV(alphas=DEFAULT_ALPHAS).fit(pca.transform(x[train, layer]), (y[train] - mu) / sd)
            theirs = sk_r2(y[test], ridge.predict(pca.transform(x[test, layer])) * sd + mu)
            assert sk_r2(y[test], pred[i, layer].numpy()) == pytest.approx(theirs, abs=1e-6)
            assert probe.explained_variance_ratio_[i, layer] == pytest.approx(pca.explained_variance_ratio_.sum())


def test_transfer_matrix_on_a_known_case():
    rng = np.random.default_rng(0)
    n, d = 400, 20
    y = rng.normal(size=(n, 1))
    u, v = np.eye(d)[0], np.eye(d)[1]  # prompt b writes the target along another direction
    a = rng.normal(size=(n, d)) + 3 * y * u
    b = rng.normal(size=(n, d)) + 3 * y * v
    data = entity_data(y, rng.random(n) < 0.25, kind="time")
    out = an.transfer_matrix({"a": torch.as_tensor(a), "a_again": torch.as_tensor(a), "b": torch.as_tensor(b)},
                             data)
    r2, cos = np.array(out["r2"]), np.array(out["cosine"])
    assert out["prompts"] == ["a", "a_again", "b"]
    assert r2[0, 0] > 0.85 and r2[0, 1] == pytest.approx(r2[0, 0]) and r2[2, 2] > 0.85
    assert r2[0, 2] < 0.1 and r2[2, 0] < 0.1  # a probe along u reads nothing where the target lies along v
    assert cos[0, 1] == pytest.approx(1.0) and abs(cos[0, 2]) < 0.3 and np.allclose(cos, cos.T)
    ci = np.array(out["r2_ci95"])  # each cell's bootstrap interval holds its R² and separates reading from not
    assert ci.shape == (3, 3, 2) and np.all(ci[..., 0] <= r2) and np.all(r2 <= ci[..., 1])
    assert ci[0, 2, 1] < ci[0, 0, 0] and out["n_test"] == int(data.is_test.sum())


def blocks_case(seed: int = 0) -> tuple[torch.Tensor, EntityData]:
    """Places in four countries; activations hold the coordinates linearly."""
    rng = np.random.default_rng(seed)
    n = 400
    country = rng.choice(["A", "B", "C", "D"], size=n)
    centre = {"A": (10, 10), "B": (40, -60), "C": (-20, 100), "D": (50, 20)}
    targets = np.array([centre[c] for c in country]) + 3 * rng.normal(size=(n, 2))
    acts = np.concatenate([targets / 30, rng.normal(size=(n, 10))], 1) + 0.05 * rng.normal(size=(n, 12))
    frame = pd.DataFrame({"country": country, "entity_type": np.where(rng.random(n) < 0.5, "city", "river")})
    return torch.as_tensor(acts), entity_data(targets, rng.random(n) < 0.3, frame)


def test_heldout_blocks_scored_against_the_whole_test_set():
    acts, data = blocks_case()
    rows = an.heldout_block_scores(acts, data, "country", n_blocks=4)
    assert [r["block"] for r in rows] and all(0 <= r["proximity_error_seen"] <= 1 for r in rows)
    for r in rows:
        for key in ("seen", "heldout"):  # one linear map serves every country: a held-out one is read too
            assert r[f"proximity_error_{key}"] < 0.2 and r[f"r2_{key}_vs_test_variance"] > 0.9
    truth = torch.tensor([[1.0], [2.0], [3.0]])
    assert an.r2_against(truth[:2], truth[:2], truth) == 1.0
    assert an.r2_against(truth[:1], truth[1:2], truth) == pytest.approx(1 - 1 / (2 / 3))
    low, high = an.r2_against_interval(truth[:2], truth[:2] + torch.tensor([[0.5], [-0.5]]), truth)
    assert low <= an.r2_against(truth[:2], truth[:2] + torch.tensor([[0.5], [-0.5]]), truth) <= high < 1


def test_entity_type_transfer():
    acts, data = blocks_case()
    out = an.entity_type_transfer(acts, data, "entity_type")
    assert sorted(out["types"]) == ["city", "river"] and np.array(out["r2"]).shape == (2, 2)
    assert np.min(out["r2"]) > 0.9 and np.max(out["proximity_error"]) < 0.2  # one linear map serves both types
    ci = np.array(out["r2_ci95"])
    assert ci.shape == (2, 2, 2) and np.all(ci[..., 0] <= np.array(out["r2"]) + 1e-12) and ci.min() > 0.8


def test_neurons_by_weights_find_the_neuron_written_along_the_probe(tiny):
    weights = mlp_neuron_weights(tiny.bridge, tiny.hf_model, 1)
    n_neurons = tiny.hf_model.config.intermediate_size
    assert set(weights) == {"in", "gate", "out"} and weights["out"].shape == (n_neurons, tiny.d_model)
    down = tiny.hf_model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(weights["out"][7], down[:, 7].detach())
    rng = np.random.default_rng(0)
    neurons = torch.as_tensor(rng.normal(size=(100, n_neurons)), device=down.device)
    target = neurons[:, 3:4].cpu().numpy() * 5 + 1  # neuron 3 carries the target
    data = entity_data(target, np.arange(100) >= 80, kind="time")
    out = an.neuron_weight_alignment(tiny, 1, weights["out"][7][None], neurons, data, top=2)
    year = out["targets"]["year"]
    assert year["by_output_weight"][0]["neuron"] == 7 and year["by_output_weight"][0]["cos_out"] == pytest.approx(1)
    assert year["by_activation"][0]["neuron"] == 3 and year["by_activation"][0]["correlation"] == pytest.approx(1)
    assert out["inputs"] == ["gate", "in"]


def test_prompt_variants(tiny):
    data = entity_data(np.zeros((3, 1)), np.zeros(3, bool), kind="time")
    data.entities[:] = ["Paris", "Rome", "Oslo"]
    caps = an.variant_prompts(data, "Where is {entity}?", "caps", tiny.tokenizer)
    assert [p[s[0]:s[1]] for p, s in caps] == ["PARIS", "ROME", "OSLO"] and caps[0][0] == "Where is PARIS?"
    prefixed = an.variant_prompts(data, "Where is {entity}?", "random_prefix", tiny.tokenizer, seed=1)
    assert [p[s[0]:s[1]] for p, s in prefixed] == data.entities
    assert all(p.endswith(f"Where is {e}?") for (p, _), e in zip(prefixed, data.entities, strict=True))
    assert len({p.split("Where")[0] for p, _ in prefixed}) == 3  # a new prefix for each entity
    assert an.variant_prompts(data, "Where is {entity}?", "random_prefix", tiny.tokenizer, seed=1) == prefixed
    with pytest.raises(ValueError, match="unknown prompt variant"):
        an.variant_prompts(data, "{entity}", "poem", tiny.tokenizer)


def test_models_side_by_side_line_up_by_depth(tiny):
    models = list(resolve_models([tiny.name, RANDOM_TWIN], tiny))
    assert models[0] is tiny and models[1].name.startswith("random-weights:")
    out = models_side_by_side(models, ["art"], 60, progress=False)
    assert [m["name"] for m in out["models"]] == [tiny.name, models[1].name]
    for m in out["models"]:
        assert m["depth"][0] == 0 and m["depth"][-1] == 1 and len(m["r2"]["art"]) == tiny.n_layers + 1
    assert len(plots.models_side_by_side(out).data) == 2


def test_the_run_writes_each_comparison_and_skips_each_on_request(tiny, tmp_path):
    settings = SpaceTimeSettings(datasets=["world_place"], n_entities=80, templates=["empty", "question"],
                                 controls=False, n_blocks=2, mlp_epochs=2, pca_ks=[1, 5], out=tmp_path,
                                 compare_models=[RANDOM_TWIN])
    results, runs = space_time.reproduce(tiny, settings, progress=False)
    entry = results["datasets"]["world_place"]
    side_by_side = results["models_side_by_side"]["models"]  # the probed model's curves come from its own run
    assert [m["name"] for m in side_by_side] == [tiny.name, f"random-weights:{tiny.name}"]
    assert side_by_side[0]["r2"]["world_place"] == entry["r2"]
    for key in ("ridge_vs_mlp", "pca", "prompt_robustness", "entity_type_transfer", "neuron_weights", "ridge_views",
                "heldout_block_scores", "heldout_blocks"):
        assert key in entry, key
    prompts = entry["prompt_robustness"]["prompts"]
    assert prompts == ["empty", "question", "empty_random_prefix", "empty_caps", "question_random_prefix",
                       "question_caps"]
    assert np.array(entry["prompt_robustness"]["r2"]).shape == (6, 6)
    assert entry["pca"]["ks"] == [1, 5, tiny.d_model] and len(entry["ridge_vs_mlp"]["mlp_r2"]) == tiny.n_layers + 1
    assert set(entry["ridge_views"]["r2_by_target"]) == {"latitude", "longitude"}
    names = set(plots.figures(results, runs))
    assert {"ridge_vs_mlp", "pca_by_k", "prompt_transfer", "entity_type_transfer", "train_test_gap"} <= names
    skipped = settings.replace(mlp=False, pca=False, prompt_transfer=False, entity_types=False,
                               neuron_weights=False, ridge_views=False, templates=["empty"], compare_models=[])
    entry = space_time.reproduce(tiny, skipped, progress=False)[0]["datasets"]["world_place"]
    assert not {"ridge_vs_mlp", "pca", "prompt_robustness", "entity_type_transfer", "neuron_weights",
                "ridge_views"} & set(entry)


def test_the_twin_side_by_side_comes_from_the_controls_and_equals_probing_it(tiny):
    """With the controls on, the random twin's curves are read from the random-weights control, not probed again:
    the same numbers as probing the twin."""
    from probes.random_models import random_twin
    from probes.space_time_models import model_curves

    settings = SpaceTimeSettings(datasets=["art"], n_entities=60, templates=["empty"], n_blocks=1, mlp=False,
                                 pca=False, prompt_transfer=False, entity_types=False, neuron_weights=False,
                                 ridge_views=False, compare_models=[RANDOM_TWIN])
    results, _ = space_time.reproduce(tiny, settings, progress=False)
    reused = results["models_side_by_side"]["models"][1]
    probed = model_curves(random_twin(tiny, settings.seed), ["art"], 60, progress=False)
    assert reused["name"] == probed["name"]
    np.testing.assert_allclose(reused["r2"]["art"], probed["r2"]["art"], rtol=1e-9, atol=1e-12)
    assert reused["peak"]["art"]["r2"] == pytest.approx(probed["peak"]["art"]["r2"], rel=1e-9)
