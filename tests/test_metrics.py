import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import r2_score as sk_r2

from probes.metrics import (
    _resample_rows,
    average_precision,
    bootstrap_auc,
    bootstrap_r2,
    exact_match,
    exact_match_rate,
    exact_matches,
    haversine_km,
    normalize_answer,
    pearson,
    proximity_error,
    r2_score,
    roc_auc,
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


def tied_scores(n: int, layers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a positive rate of about a third and scores [layers, n] rounded to a few values (many ties),
    from chance level (row 0) to a clear signal."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    y[:2] = [0, 1]
    strength = np.linspace(0, 2, layers)[:, None]
    return np.round(rng.normal(size=(layers, n)) + strength * y, 1 if n >= 100 else 0), y


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_and_average_precision_match_sklearn_with_ties(seed):
    n = [7, 40, 300][seed % 3]
    scores, y = tied_scores(n, 4, seed)
    assert len(np.unique(scores[0])) < n  # ties
    auroc, ap = roc_auc(torch.tensor(scores), y), average_precision(torch.tensor(scores), torch.tensor(y))
    assert auroc.shape == ap.shape == (4,) and auroc.dtype == torch.float64
    for layer in range(4):
        assert float(auroc[layer]) == pytest.approx(roc_auc_score(y, scores[layer]), abs=1e-12)
        assert float(ap[layer]) == pytest.approx(average_precision_score(y, scores[layer]), abs=1e-12)
    assert roc_auc(scores[2], y) == pytest.approx(roc_auc_score(y, scores[2]), abs=1e-12)  # [n]: a float
    labels = np.stack([y, 1 - y, y, np.roll(y, 1)])  # one label row per score row
    np.testing.assert_allclose(average_precision(scores, labels).numpy(),
                               [average_precision_score(t, s) for t, s in zip(labels, scores, strict=True)], atol=1e-12)


def test_areas_at_the_extremes():
    y = np.array([0, 0, 1, 1, 0, 1])
    assert roc_auc(y * 2.0, y) == 1.0 and average_precision(y * 2.0, y) == 1.0
    assert roc_auc(-y, y) == 0.0
    flat = np.zeros(6)  # one tie: chance, and precision = the positive rate at the only threshold
    assert roc_auc(flat, y) == 0.5 and average_precision(flat, y) == 0.5
    assert average_precision(flat, [1, 0, 0, 0, 0, 0]) == pytest.approx(1 / 6)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75  # scikit-learn's doc example


def grouped_case(n_groups: int, seed: int = 0, per_group: tuple[int, int] = (1, 6)):
    """Scores [2, n] of a weak and a strong scorer, labels, and string group names; rows of a group share a
    group-level shift, so resampling rows would understate the spread."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*per_group, size=n_groups)
    groups = np.repeat([f"q{g}" for g in range(n_groups)], sizes)
    y = (rng.random(len(groups)) < 0.4).astype(int)
    shift = rng.normal(size=n_groups)[np.repeat(np.arange(n_groups), sizes)]
    scores = np.stack([np.round(y * 0.5 + shift + rng.normal(size=len(y)), 1), 2 * y + shift])
    return scores, y, groups


def test_bootstrap_auc_matches_a_direct_computation():
    scores, y, groups = grouped_case(30)
    names, codes = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(len(names))]
    draws = _resample_rows(len(names), 150, 7, torch.device("cpu")).numpy()
    for metric, reference, ours in (("auroc", roc_auc_score, roc_auc), ("auprc", average_precision_score,
                                                                           average_precision)):
        entries = bootstrap_auc(torch.tensor(scores), y, groups, metric=metric, n_resamples=150, seed=7)
        assert len(entries) == 2
        for layer, entry in enumerate(entries):
            direct = [reference(y[rows], scores[layer, rows])
                      for rows in (np.concatenate([members[g] for g in draw]) for draw in draws)]
            assert entry["value"] == float(ours(scores[layer], y))
            assert entry["ci95"] == pytest.approx(list(np.percentile(direct, [2.5, 97.5])), abs=1e-12)
            assert entry["ci95"][0] < entry["value"] < entry["ci95"][1]
            assert {k: entry[k] for k in ("metric", "n", "n_groups", "n_resamples", "n_skipped", "seed")} == {
                "metric": metric, "n": len(y), "n_groups": 30, "n_resamples": 150, "n_skipped": 0, "seed": 7}
    assert bootstrap_auc(scores, y, groups, n_resamples=150, seed=7, max_block=50) == \
        bootstrap_auc(scores, y, groups, n_resamples=150, seed=7)  # scored in blocks


def test_bootstrap_auc_skips_resamples_without_both_classes():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    groups = np.repeat(np.arange(6), 2)  # the positives are all in group 0: 6 draws miss it (5/6)^6 of the time
    scores = np.arange(12.0)[::-1] * 0.1 + np.tile([0.0, 0.05], 6)
    entry = bootstrap_auc(scores, y, groups, metric="auprc", n_resamples=400, seed=1)
    draws = _resample_rows(6, 400, 1, torch.device("cpu")).numpy()
    skipped = int((~(draws == 0).any(1)).sum())
    assert entry["n_skipped"] == skipped and 0.2 < skipped / 400 < 0.5
    direct = [average_precision_score(y[rows], scores[rows]) for rows in
              (np.concatenate([np.flatnonzero(groups == g) for g in draw]) for draw in draws if (draw == 0).any())]
    assert entry["ci95"] == pytest.approx(list(np.percentile(direct, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_auc_groups_seeds_and_sample_size():
    scores, y, groups = grouped_case(40, seed=3)
    entry = bootstrap_auc(scores[0], y, groups)
    assert entry == bootstrap_auc(scores[0], y, groups) and entry["n_resamples"] == 2000 and entry["seed"] == 0
    assert bootstrap_auc(scores[0], y, groups, seed=1)["ci95"] != entry["ci95"]
    # rows sharing a group shift are not independent: resampling them as rows understates the spread
    rows = bootstrap_auc(scores[0], y)
    assert rows["n_groups"] == len(y) and np.diff(rows["ci95"])[0] < np.diff(entry["ci95"])[0]
    widths = []
    for n_groups in (15, 60, 240):
        scores, y, groups = grouped_case(n_groups, seed=n_groups)
        widths.append(np.diff(bootstrap_auc(scores[1], y, groups, "auprc", n_resamples=500)["ci95"])[0])
    assert widths[0] > widths[1] > widths[2] > 0
    # groups of identical rows: resampling the groups is resampling the distinct rows (the same draws)
    distinct, labels = tied_scores(50, 1, seed=5)
    copies = np.repeat(distinct[0], 3)
    for metric in ("auroc", "auprc"):
        grouped = bootstrap_auc(copies, np.repeat(labels, 3), np.repeat(np.arange(50), 3), metric, 300)
        single = bootstrap_auc(distinct[0], labels, None, metric, 300)
        assert grouped["value"] == pytest.approx(single["value"], abs=1e-12)
        assert grouped["ci95"] == pytest.approx(single["ci95"], abs=1e-12)
        assert grouped["n_groups"] == single["n_groups"] == 50 and grouped["n"] == 150


def test_area_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="both classes"):
        average_precision(np.zeros((2, 3)), [[0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0 and 1"):
        roc_auc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        average_precision([0.1, float("nan"), 0.3], [0, 1, 0])
    with pytest.raises(ValueError, match=r"\[n_layers, n\]"):
        roc_auc(np.zeros((2, 2, 3)), [0, 1, 0])
    with pytest.raises(ValueError, match="groups must be"):
        bootstrap_auc([0.1, 0.2, 0.3], [0, 1, 0], groups=[0, 1])
    with pytest.raises(ValueError, match="metric"):
        bootstrap_auc([0.1, 0.2, 0.3], [0, 1, 0], metric="f1")
    with pytest.raises(ValueError, match="labels must be \\[n\\]"):
        bootstrap_auc(np.zeros((2, 3)), [[0, 1, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match="at least 1 resample"):
        bootstrap_auc([0.1, 0.2, 0.3], [0, 1, 0], n_resamples=0)
    seed = next(s for s in range(100) if _resample_rows(2, 1, s, torch.device("cpu"))[0].unique().numel() == 1)
    with pytest.raises(ValueError, match="single class"):  # two one-class groups, one resample drawing one twice
        bootstrap_auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], groups=[0, 0, 1, 1], n_resamples=1, seed=seed)
