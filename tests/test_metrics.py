import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import r2_score as sk_r2

from probes.metrics import (
    _resample_rows,
    bootstrap_r2,
    exact_match,
    exact_match_rate,
    exact_matches,
    haversine_km,
    normalize_answer,
    pearson,
    proximity_error,
    r2_score,
    spearman,
)


def test_r2_matches_sklearn_single_multi_and_batched():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2)) * [1.0, 30.0]
    b = a + rng.normal(size=(200, 2)) * [0.5, 40.0]
    assert r2_score(torch.tensor(a), torch.tensor(b)) == pytest.approx(sk_r2(a, b), abs=1e-12)
    assert r2_score(a[:, 1], b[:, 1]) == pytest.approx(sk_r2(a[:, 1], b[:, 1]), abs=1e-12)
    layers = np.stack([b, a, 2 * b])
    batched = r2_score(a, torch.tensor(layers))
    assert batched.shape == (3,)
    np.testing.assert_allclose(batched.numpy(), [sk_r2(a, p) for p in layers], atol=1e-12)
    const = np.ones(5)  # constant target: 1 when predicted exactly, else 0 (as scikit-learn)
    assert r2_score(const, const) == sk_r2(const, const) == 1.0
    assert r2_score(const, np.arange(5.0)) == sk_r2(const, np.arange(5.0)) == 0.0


def noisy_predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two targets of different scales (as latitude and longitude) and predictions of R² about 0.5."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, 2)) * [10.0, 50.0]
    return truth, truth + rng.normal(size=(n, 2)) * [8.0, 40.0]


def test_bootstrap_r2_matches_a_direct_computation():
    truth, pred = noisy_predictions(120)
    entry = bootstrap_r2(truth, pred, n_resamples=300, seed=3)
    assert entry["r2"] == r2_score(truth, pred) and entry["r2"] == pytest.approx(sk_r2(truth, pred), abs=1e-12)
    rows = _resample_rows(120, 300, 3, torch.device("cpu")).numpy()
    direct = [sk_r2(truth[r], pred[r]) for r in rows]  # uniform average over the targets, as the probes' R²
    assert entry["ci95"] == pytest.approx(list(np.percentile(direct, [2.5, 97.5])), abs=1e-12)
    low, high = entry["ci95"]
    assert low < entry["r2"] < high and entry["n"] == 120
    assert bootstrap_r2(truth, pred, n_resamples=300, seed=3, max_block=1000) == entry  # scored in blocks
    single = bootstrap_r2(torch.tensor(truth[:, 0]), torch.tensor(pred[:, 0]))
    assert single["r2"] == pytest.approx(sk_r2(truth[:, 0], pred[:, 0]), abs=1e-12)


def test_bootstrap_r2_is_seeded_and_narrows_with_n():
    truth, pred = noisy_predictions(400)
    entry = bootstrap_r2(truth, pred)
    assert entry == bootstrap_r2(truth, pred) and entry["n_resamples"] == 2000 and entry["seed"] == 0
    assert bootstrap_r2(truth, pred, seed=1)["ci95"] != entry["ci95"]
    widths = [np.diff(bootstrap_r2(*noisy_predictions(n, seed=n))["ci95"])[0] for n in (50, 400, 3200)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_pearson_and_spearman_with_ties_match_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(size=300)
    b = a + b
    assert pearson(a, b) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)
    ties_a, ties_b = np.round(a), np.round(b * 2)
    assert len(np.unique(ties_a)) < 20  # many ties
    assert spearman(ties_a, ties_b) == pytest.approx(spearmanr(ties_a, ties_b)[0], abs=1e-12)
    assert spearman(torch.tensor(a), torch.tensor(b ** 3)) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    assert spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(pearson(np.ones(4), a[:4]))


def test_haversine_known_distances():
    paris, london, new_york = (48.8566, 2.3522), (51.5074, -0.1278), (40.7128, -74.0060)
    assert float(haversine_km(*paris, *london)) == pytest.approx(343.5, abs=1.5)
    assert float(haversine_km(*london, *new_york)) == pytest.approx(5570, abs=10)
    assert float(haversine_km(0, 0, 0, 180)) == pytest.approx(np.pi * 6371, rel=1e-12)
    both = haversine_km(torch.tensor([paris[0], london[0]]), torch.tensor([paris[1], london[1]]), *paris)
    assert both[0] == 0 and both[1] == pytest.approx(343.5, abs=1.5)


def test_proximity_error_by_hand():
    true = torch.tensor([0.0, 1.0, 2.0, 10.0])
    pred = torch.tensor([0.0, 1.0, 4.5, 10.0])
    # entity 2 is predicted 2.5 away; of the 3 others, entities 0 (2 away) and 1 (1 away) are closer -> 2/3
    assert proximity_error(pred, true).tolist() == pytest.approx([0.0, 0.0, 2 / 3, 0.0])
    places = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 50.0]])
    guess = places.clone()
    guess[0] = torch.tensor([0.0, 2.0])  # 2 degrees off: entity 1 (1 degree away) is closer, entity 2 is not
    assert proximity_error(guess, places, max_block=3).tolist() == pytest.approx([0.5, 0.0, 0.0])


@pytest.mark.parametrize("columns", [1, 2])
def test_proximity_error_matches_brute_force_in_blocks(columns):
    rng = np.random.default_rng(2)
    n = 150
    if columns == 2:
        true = np.c_[rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)]
        pred = true + rng.normal(scale=15, size=(n, 2))
        pair = haversine_km(true[:, None, 0], true[:, None, 1], true[None, :, 0], true[None, :, 1]).numpy()
        own = haversine_km(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1]).numpy()
    else:
        true = rng.uniform(1000, 2000, n)
        pred = true + rng.normal(scale=50, size=n)
        pair, own = np.abs(true[:, None] - true[None, :]), np.abs(pred - true)
    closer = pair < own[:, None]
    np.fill_diagonal(closer, False)
    expected = closer.sum(1) / (n - 1)
    np.testing.assert_allclose(proximity_error(pred, true, max_block=1000).numpy(), expected)
    assert 0 < expected.mean() < 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        r2_score(torch.zeros(5), torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        r2_score([1.0], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        spearman(np.zeros((5, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="same length"):
        pearson(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="columns"):
        proximity_error(np.zeros((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        proximity_error(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="at least 2 samples, got 0"):
        bootstrap_r2(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="shape"):
        bootstrap_r2(np.zeros((5, 2)), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="shape"):
        bootstrap_r2(np.zeros(5), np.zeros((3, 5)))  # a layer axis: one layer at a time
    with pytest.raises(ValueError, match="at least 1 resample"):
        bootstrap_r2(np.arange(5.0), np.arange(5.0), n_resamples=0)


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Beatles! ") == "beatles"
    assert normalize_answer("An apple,  a day") == "apple day"
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words
    assert normalize_answer("“Señor” – Ñandú") == "señor ñandú"  # Unicode punctuation too
    assert exact_match("the United Kingdom.", ["UK", "United Kingdom"])
    assert exact_match("uk", "UK")
    assert not exact_match("United", "United Kingdom")
    assert not exact_match("", "United Kingdom")
    with pytest.raises(ValueError, match="at least one answer"):
        exact_match("x", [])


def test_exact_matches_and_their_rate():
    assert exact_matches(["The B.", "c"], [("b",), ("a", "C")]) == [True, True]
    assert exact_match_rate(["The B.", "c"], [("b",), ("a",)]) == 0.5
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        exact_matches(["a", "b"], [("a",)])
    with pytest.raises(ValueError):
        exact_match_rate([], [])
