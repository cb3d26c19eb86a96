import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import r2_score as sk_r2

from probes.metrics import haversine_km, pearson, proximity_error, r2_score, spearman


def test_r2_pearson_spearman_match_reference_libraries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2))
    b = a + rng.normal(size=(200, 2))
    assert r2_score(torch.tensor(a), torch.tensor(b)) == pytest.approx(sk_r2(a, b))
    assert pearson(a[:, 0], b[:, 0]) == pytest.approx(pearsonr(a[:, 0], b[:, 0])[0])
    ties_a, ties_b = np.round(a[:, 0]), np.round(b[:, 0] * 2)
    assert spearman(ties_a, ties_b) == pytest.approx(spearmanr(ties_a, ties_b)[0])


def test_haversine_known_distance():
    paris, london = (48.8566, 2.3522), (51.5074, -0.1278)
    assert float(haversine_km(*paris, *london)) == pytest.approx(344, abs=2)
    assert float(haversine_km(0, 0, 0, 180)) == pytest.approx(np.pi * 6371, rel=1e-9)


def test_proximity_error_by_hand():
    true = torch.tensor([0.0, 1.0, 2.0, 10.0])
    pred = torch.tensor([0.0, 1.0, 4.5, 10.0])
    # entity 2 is predicted 2.5 away; entities 0 (2 away), 1 (1 away) and 2 itself are closer -> 3/4
    assert proximity_error(pred, true).tolist() == [0.0, 0.0, 0.75, 0.0]
    places = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 50.0]])
    guess = places.clone()
    guess[0] = torch.tensor([0.0, 2.0])
    assert proximity_error(guess, places, chunk=2).tolist() == pytest.approx([2 / 3, 0.0, 0.0])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        r2_score(torch.zeros(5), torch.zeros(4))
