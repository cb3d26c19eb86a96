import numpy as np
import pytest
import sklearn
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score as sk_r2

from probes import linear
from probes.linear import DEFAULT_ALPHAS, LogisticProbe, RidgeProbe


def planted(n, layers, d, targets, seed=0, noise=1.0):
    """Features of uneven scale, a sparse linear signal per layer, noise, and a target offset."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, layers, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    w = rng.normal(size=(layers, d, targets)) * (rng.random((layers, d, 1)) < 0.3)
    y = np.einsum("nld,ldt->nt", x, w) / layers + noise * rng.normal(size=(n, targets)) + 5.0
    return x, y


@pytest.mark.parametrize("n, d, targets", [(400, 30, 2), (60, 120, 2), (150, 40, 1)])  # cov side, Gram side
def test_ridge_matches_sklearn_ridgecv_per_layer(n, d, targets):
    layers = 3
    x, y = planted(n + 200, layers, d, targets)
    y = y[:, 0] if targets == 1 else y
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
    probe = RidgeProbe().fit(torch.tensor(xtr), ytr)
    ours = probe.score(torch.tensor(xte), yte)
    assert ours.shape == (layers,) and probe.alpha_.shape == (layers,)
    assert probe.coef_.shape == ((layers, d) if targets == 1 else (layers, targets, d))
    mu, sd = ytr.mean(0), ytr.std(0)
    pred = probe.predict(torch.tensor(xte)).numpy()
    chosen = set()
    for layer in range(layers):
        ref = RidgeCV(alphas=DEFAULT_ALPHAS, fit_intercept=True).fit(xtr[:, layer], (ytr - mu) / sd)
        chosen.add(ref.alpha_)
        assert probe.alpha_[layer] == ref.alpha_
        ref_pred = ref.predict(xte[:, layer]) * sd + mu
        assert abs(float(ours[layer]) - sk_r2(yte, ref_pred)) < 1e-3
        np.testing.assert_allclose(pred[layer], ref_pred, rtol=1e-6, atol=1e-6)
        ref_coef = ref.coef_ * (sd[:, None] if targets > 1 else sd)
        np.testing.assert_allclose(probe.coef_[layer].numpy(), ref_coef, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(probe.intercept_[layer].numpy(), ref.intercept_ * sd + mu, rtol=1e-6, atol=1e-6)
    assert probe.cv_mse_.shape == (layers, len(DEFAULT_ALPHAS))
    assert np.all(probe.alpha_ == np.asarray(DEFAULT_ALPHAS)[probe.cv_mse_.argmin(1)])


def test_ridge_alpha_selection_reacts_to_noise():
    """Pure noise targets need the largest alpha; a clean signal a small one (the LOO criterion is live)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 20))
    clean = RidgeProbe().fit(torch.tensor(x), x @ rng.normal(size=20) + 0.01 * rng.normal(size=300))
    noise = RidgeProbe().fit(torch.tensor(x), rng.normal(size=300))
    assert clean.alpha_ < 1.0 and noise.alpha_ > 1e3


def test_ridge_without_intercept_matches_sklearn():
    x, y = planted(300, 1, 15, 1, seed=4)
    x, y = x[:, 0], y[:, 0]
    probe = RidgeProbe(fit_intercept=False, standardize_targets=False).fit(torch.tensor(x), y)
    ref = RidgeCV(alphas=DEFAULT_ALPHAS, fit_intercept=False).fit(x, y)
    assert probe.alpha_ == ref.alpha_ and float(probe.intercept_) == 0.0
    np.testing.assert_allclose(probe.coef_.numpy(), ref.coef_, rtol=1e-6, atol=1e-9)


def test_ridge_layer_chunks_give_the_same_fit():
    x, y = planted(200, 5, 12, 2, seed=5)
    whole = RidgeProbe().fit(torch.tensor(x), y)
    chunked = RidgeProbe(layer_chunk_bytes=1).fit(torch.tensor(x, dtype=torch.float32), y)  # one layer a chunk
    np.testing.assert_array_equal(whole.alpha_, chunked.alpha_)
    torch.testing.assert_close(whole.coef_, chunked.coef_, rtol=1e-4, atol=1e-6)  # float32 input: ~1e-7 rel


def test_ridge_single_layer_single_target_shapes_and_float32_input():
    x, y = planted(300, 1, 20, 1)
    probe = RidgeProbe().fit(torch.tensor(x[:, 0], dtype=torch.float32), torch.tensor(y[:, 0]))
    assert probe.coef_.shape == (20,) and probe.intercept_.shape == () and isinstance(probe.alpha_, float)
    assert probe.coef_.dtype == torch.float64
    assert probe.predict(torch.tensor(x[:5, 0])).shape == (5,)
    assert probe.score(torch.tensor(x[:, 0]), y[:, 0]) > 0.5
    assert probe.cv_mse_.shape == (len(DEFAULT_ALPHAS),)


def test_ridge_bad_inputs():
    x = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="n_samples = 10"):
        RidgeProbe().fit(x, np.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(x, np.r_[np.zeros(9), np.nan])
    bad = x.clone()
    bad[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(bad, np.arange(10.0))
    with pytest.raises(ValueError, match="at least 2"):
        RidgeProbe().fit(x[:1], np.zeros(1))
    with pytest.raises(ValueError, match=r"\[n_samples, d\]"):
        RidgeProbe().fit(torch.randn(10), np.zeros(10))
    with pytest.raises(ValueError, match="positive"):
        RidgeProbe(alphas=[0.0, 1.0])
    with pytest.raises(RuntimeError, match="fit"):
        RidgeProbe().predict(x)
    probe = RidgeProbe().fit(x, np.arange(10.0))
    with pytest.raises(ValueError, match="width"):
        probe.predict(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="layer"):
        probe.predict(torch.randn(3, 3, 4))


def test_logistic_matches_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2, 8)) * rng.uniform(0.5, 4, size=8) + 1.0
    y = (x[:, 0, 0] + 0.5 * x[:, 0, 1] - 1.5 + 0.5 * rng.normal(size=300) > 0).astype(int)
    for C in (0.05, 10.0):
        probe = LogisticProbe(C=C).fit(torch.tensor(x), y)
        proba = probe.predict_proba(torch.tensor(x))
        assert proba.shape == (2, 300, 2) and probe.coef_.shape == (2, 8) and probe.intercept_.shape == (2,)
        for layer in range(2):
            ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x[:, layer], y)
            np.testing.assert_allclose(probe.coef_[layer].numpy(), ref.coef_[0], rtol=1e-4, atol=1e-5)
            assert float(probe.intercept_[layer]) == pytest.approx(ref.intercept_[0], abs=1e-4)
            np.testing.assert_allclose(proba[layer].numpy(), ref.predict_proba(x[:, layer]), atol=1e-6)
            assert float(probe.score(torch.tensor(x), y)[layer]) == pytest.approx(ref.score(x[:, layer], y))
    assert probe.score(torch.tensor(x), y)[0] > 0.8 > probe.score(torch.tensor(x), y)[1]


def test_logistic_separable_data_converges_and_single_layer_shapes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] > 0).astype(int)  # separable: only the penalty keeps w finite
    probe = LogisticProbe(C=100.0).fit(torch.tensor(x, dtype=torch.float32), y)
    ref = LogisticRegression(C=100.0, tol=1e-10, max_iter=100_000).fit(x, y)
    assert probe.coef_.shape == (5,) and probe.intercept_.shape == () and probe.n_iter_ < 100
    np.testing.assert_allclose(probe.coef_.numpy(), ref.coef_[0], rtol=1e-3, atol=1e-3)
    assert probe.score(torch.tensor(x), y) == 1.0
    assert probe.predict(torch.tensor(x[:4])).tolist() == y[:4].tolist()


def test_logistic_bad_inputs():
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="0 and 1"):
        LogisticProbe().fit(x, np.full(20, 2))
    with pytest.raises(ValueError, match="both"):
        LogisticProbe().fit(x, np.ones(20))
    with pytest.raises(ValueError, match="n_samples = 20"):
        LogisticProbe().fit(x, np.r_[np.zeros(10), np.ones(11)])
    with pytest.raises(ValueError, match="positive"):
        LogisticProbe(C=0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        LogisticProbe(penalty="elasticnet")
    with pytest.raises(ValueError, match="max_iter"):
        LogisticProbe(penalty="l1", max_iter=0)
    with pytest.raises(ValueError, match="both"):
        LogisticProbe(penalty="l1").fit(x, np.zeros(20))
    with pytest.raises(RuntimeError, match="fit"):
        LogisticProbe().predict(x)


SKLEARN_L1 = {"l1_ratio": 1.0} if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8) \
    else {"penalty": "l1"}  # scikit-learn 1.8 deprecated penalty="l1" for l1_ratio=1


def sklearn_l1(C):
    """scikit-learn's L1 logistic regression with an unpenalised intercept (saga; liblinear penalises it)."""
    return LogisticRegression(C=C, solver="saga", tol=1e-10, max_iter=100_000, random_state=0, **SKLEARN_L1)


def l1_objective(x, y, w, b, C):
    """|w|₁ + C·Σ log-loss, scikit-learn's objective for the L1 penalty."""
    z = x @ w + b
    return np.abs(w).sum() + C * (np.logaddexp(0, z) - y * z).sum()


def assert_l1_optimal(x, y, w, b, C, rel=1e-7):
    """The optimality conditions of the L1 objective: the log-loss gradient C·Σ x (y - p) equals sign(w_j) where
    w_j != 0 and is at most 1 in size where w_j = 0; the intercept's gradient is 0."""
    resid = y - 1 / (1 + np.exp(-(x @ w + b)))
    grad = C * x.T @ resid
    assert abs(C * resid.sum()) < rel * C * len(y)
    np.testing.assert_allclose(grad[w != 0], np.sign(w[w != 0]), atol=rel * 10)
    assert np.all(np.abs(grad[w == 0]) <= 1 + rel)


def sparse_planted(n=300, layers=3, d=20, seed=0):
    """Features of uneven scale and offset, labels from a sparse linear signal per layer (not separable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, layers, d)) * rng.uniform(0.5, 2, size=d) + 0.5 * rng.normal(size=d)
    w = rng.normal(size=(layers, d)) * (rng.random((layers, d)) < 0.3)
    z = np.einsum("nld,ld->nl", x, w)
    y = (z[:, 0] + z[:, 1] + rng.normal(size=n) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_l1_logistic_matches_sklearn_saga(C):
    x, y = sparse_planted()
    probe = LogisticProbe(C=C, penalty="l1").fit(torch.tensor(x), y)
    assert probe.coef_.shape == (3, 20) and probe.intercept_.shape == (3,) and np.all(probe.n_iter_ < 2000)
    proba, pred = probe.predict_proba(torch.tensor(x)), probe.predict(torch.tensor(x))
    zeros = []
    for layer in range(3):
        xl = x[:, layer]
        ref = sklearn_l1(C).fit(xl, y)
        w, b = probe.coef_[layer].numpy(), float(probe.intercept_[layer])
        ours, theirs = l1_objective(xl, y, w, b, C), l1_objective(xl, y, ref.coef_[0], ref.intercept_[0], C)
        assert ours == pytest.approx(theirs, rel=1e-6) and ours <= theirs * (1 + 1e-12)
        scale = np.abs(ref.coef_[0]).max()
        np.testing.assert_allclose(w, ref.coef_[0], rtol=0, atol=1e-4 * scale)
        assert b == pytest.approx(ref.intercept_[0], abs=1e-4 * max(1.0, scale))
        np.testing.assert_array_equal(w == 0, ref.coef_[0] == 0)  # the same sparsity pattern
        assert_l1_optimal(xl, y, w, b, C)
        np.testing.assert_array_equal(pred[layer].numpy(), ref.predict(xl))
        np.testing.assert_allclose(proba[layer].numpy(), ref.predict_proba(xl), atol=1e-5)
        zeros.append(int((w == 0).sum()))
    assert (C == 1.0 or min(zeros) >= 5) and max(zeros) < 20  # sparse but not empty at the smaller C


def test_l1_logistic_limits_of_C_agree_with_sklearn():
    x, y = sparse_planted(seed=1)
    xl = x[:, 0]
    # large C: the penalty hardly matters, the fit is the unpenalised one
    big = LogisticProbe(C=1e4, penalty="l1").fit(torch.tensor(xl), y)
    free = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(xl, y)
    np.testing.assert_allclose(big.coef_.numpy(), free.coef_[0], rtol=1e-3, atol=1e-4)
    assert float(big.intercept_) == pytest.approx(free.intercept_[0], abs=1e-3)
    assert np.all(big.coef_.numpy() != 0)
    # small C: every coefficient is 0 below C* = 1 / max_j |Σ x_ij (y_i - mean y)|, the intercept the log-odds
    rate = y.mean()
    c_star = 1 / np.abs(xl.T @ (y - rate)).max()
    small = LogisticProbe(C=0.9 * c_star, penalty="l1").fit(torch.tensor(xl), y)
    ref = sklearn_l1(0.9 * c_star).fit(xl, y)
    assert np.all(small.coef_.numpy() == 0) and np.all(ref.coef_ == 0)
    assert float(small.intercept_) == pytest.approx(np.log(rate / (1 - rate)), abs=1e-10)
    zero = np.zeros(20)
    assert l1_objective(xl, y, zero, float(small.intercept_), 0.9 * c_star) <= \
        l1_objective(xl, y, zero, ref.intercept_[0], 0.9 * c_star)  # saga's intercept is the looser one here
    above = LogisticProbe(C=1.2 * c_star, penalty="l1").fit(torch.tensor(xl), y)
    assert 0 < np.count_nonzero(above.coef_.numpy()) <= 3  # just above C*, the first features enter


def test_l1_logistic_is_exact_on_uneven_scales_and_constant_columns():
    """Features from 0.01 to 100 in scale (the internal standardisation must not change the objective), one
    constant column (coefficient 0), float32 input, one layer per chunk: the optimality conditions hold."""
    x, y = sparse_planted(n=250, layers=2, d=12, seed=2)
    x = x * np.logspace(-2, 2, 12)
    x[:, :, 5] = 3.0
    probe = LogisticProbe(C=0.5, penalty="l1", layer_chunk_bytes=1).fit(torch.tensor(x, dtype=torch.float32), y)
    x32 = torch.tensor(x, dtype=torch.float32).double().numpy()  # what the probe saw
    for layer in range(2):
        w, b = probe.coef_[layer].numpy(), float(probe.intercept_[layer])
        assert w[5] == 0
        assert_l1_optimal(x32[:, layer], y, w, b, 0.5)
    whole = LogisticProbe(C=0.5, penalty="l1").fit(torch.tensor(x, dtype=torch.float32), y)
    torch.testing.assert_close(whole.coef_, probe.coef_, rtol=1e-9, atol=1e-12)
    single = LogisticProbe(C=0.5, penalty="l1").fit(torch.tensor(x[:, 1]), y)
    assert single.coef_.shape == (12,) and single.intercept_.shape == () and isinstance(single.n_iter_, int)
    assert single.score(torch.tensor(x[:, 1]), y) == pytest.approx(float(probe.score(torch.tensor(x), y)[1]))


def test_l1_logistic_warns_when_not_converged():
    x, y = sparse_planted(seed=3)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        probe = LogisticProbe(C=1.0, penalty="l1", max_iter=3).fit(torch.tensor(x), y)
    assert np.all(probe.n_iter_ == 3)


def test_l1_logistic_recovers_from_a_polish_on_the_wrong_support(monkeypatch):
    """With a loose tol, FISTA hands the Newton polish a wrong support first: the optimality check must refuse it
    and FISTA go on, ending at the same minimiser as with the default tol."""
    outcomes = []
    polish = linear._l1_polish

    def recorded(*args):
        polished, exact = polish(*args)
        outcomes.append((args[-1] & ~exact).any().item())  # an attempt refused
        return polished, exact

    monkeypatch.setattr(linear, "_l1_polish", recorded)
    x, y = sparse_planted(seed=4)
    loose = LogisticProbe(C=1.0, penalty="l1", tol=0.5).fit(torch.tensor(x), y)
    assert any(outcomes)
    default = LogisticProbe(C=1.0, penalty="l1").fit(torch.tensor(x), y)
    torch.testing.assert_close(loose.coef_, default.coef_, rtol=1e-8, atol=1e-10)
    for layer in range(3):
        assert_l1_optimal(x[:, layer], y, loose.coef_[layer].numpy(), float(loose.intercept_[layer]), 1.0)
