import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score as sk_r2

from probes.linear import DEFAULT_ALPHAS, LogisticProbe, RidgeProbe


def planted(n, layers, d, targets, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, layers, d)) * rng.uniform(0.5, 3, size=d)
    w = rng.normal(size=(layers, d, targets)) * (rng.random((layers, d, 1)) < 0.3)
    y = np.einsum("nld,ldt->nt", x, w) / layers + noise * rng.normal(size=(n, targets)) + 5.0
    return x, y


@pytest.mark.parametrize("n, d", [(400, 30), (60, 120)])  # covariance side and Gram side
def test_ridge_matches_sklearn_ridgecv_per_layer(n, d):
    x, y = planted(n + 200, 3, d, 2)
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
    probe = RidgeProbe().fit(torch.tensor(xtr), ytr)
    ours = probe.score(torch.tensor(xte), yte)
    mu, sd = ytr.mean(0), ytr.std(0)
    for layer in range(3):
        ref = RidgeCV(alphas=DEFAULT_ALPHAS).fit(xtr[:, layer], (ytr - mu) / sd)
        assert probe.alpha_[layer] == pytest.approx(ref.alpha_)
        ref_r2 = sk_r2(yte, ref.predict(xte[:, layer]) * sd + mu)
        assert abs(float(ours[layer]) - ref_r2) < 1e-3
        np.testing.assert_allclose(probe.coef_[layer].numpy(), ref.coef_ * sd[:, None], rtol=1e-6, atol=1e-8)


def test_ridge_single_layer_single_target_shapes_and_float32_input():
    x, y = planted(300, 1, 20, 1)
    probe = RidgeProbe().fit(torch.tensor(x[:, 0], dtype=torch.float32), y[:, 0])
    assert probe.coef_.shape == (20,) and probe.intercept_.shape == ()
    assert probe.predict(torch.tensor(x[:5, 0])).shape == (5,)
    assert probe.score(torch.tensor(x[:, 0]), y[:, 0]) > 0.5
    assert probe.cv_mse_.shape == (1, len(DEFAULT_ALPHAS))


def test_ridge_bad_inputs():
    x = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="n_samples = 10"):
        RidgeProbe().fit(x, np.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(x, np.full(10, np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        RidgeProbe().fit(x[:1], np.zeros(1))
    with pytest.raises(ValueError, match="positive"):
        RidgeProbe(alphas=[0.0, 1.0])
    with pytest.raises(RuntimeError, match="fit"):
        RidgeProbe().predict(x)
    probe = RidgeProbe().fit(x, np.arange(10.0))
    with pytest.raises(ValueError, match="width"):
        probe.predict(torch.randn(3, 2, 5))


def test_logistic_matches_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2, 8))
    y = (x[:, 0, 0] + 0.5 * x[:, 0, 1] + 0.5 * rng.normal(size=300) > 0).astype(int)
    probe = LogisticProbe(C=0.5).fit(torch.tensor(x), y)
    for layer in range(2):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(x[:, layer], y)
        np.testing.assert_allclose(probe.coef_[layer].numpy(), ref.coef_[0], atol=1e-5)
        np.testing.assert_allclose(probe.predict_proba(torch.tensor(x))[layer].numpy(),
                                   ref.predict_proba(x[:, layer])[:, 1], atol=1e-6)
        assert float(probe.score(torch.tensor(x), y)[layer]) == pytest.approx(ref.score(x[:, layer], y))
    with pytest.raises(ValueError, match="0 and 1"):
        LogisticProbe().fit(torch.tensor(x), np.full(300, 2))
