"""Linear probes fitted on the device that holds the activations, one probe per layer, all layers in one call.

- :class:`RidgeProbe` is scikit-learn's ``RidgeCV`` (efficient leave-one-out over a grid of alphas, unpenalised
  intercept, one alpha shared by all targets) batched over layers: one eigendecomposition per layer, in float64,
  serves every alpha.
- :class:`LogisticProbe` is scikit-learn's binary ``LogisticRegression(C=C)`` (L2 penalty, unpenalised intercept)
  batched over layers, fitted by damped Newton steps in float64.

Activations come as ``[n_samples, d]`` (one layer) or ``[n_samples, n_layers, d]``; results that have a layer
axis put it first. Layers are processed in chunks that fit ``layer_chunk_bytes`` of float64 working memory.
The scikit-learn estimators stay the reference: ``tests/test_linear.py`` checks these against them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probes.metrics import r2_score

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 12))
F64 = torch.float64


def _layers_view(X) -> tuple[torch.Tensor, bool]:
    """[n, d] or [n, L, d] -> a [L, n, d] view (no copy), and whether the input had a layer axis."""
    x = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if x.dim() == 2:
        layered, x = False, x.unsqueeze(1)
    elif x.dim() == 3:
        layered = True
    else:
        raise ValueError(f"X must be [n_samples, d] or [n_samples, n_layers, d], got shape {tuple(x.shape)}")
    return x.transpose(0, 1), layered


def _check_samples(n: int) -> None:
    if n < 2:
        raise ValueError(f"need at least 2 samples to fit, got {n}")


def _targets(y, n: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """y as a float64 [n, t] tensor on ``device``, and whether it was 1-D."""
    y = torch.as_tensor(y if isinstance(y, torch.Tensor) else np.asarray(y), device=device).to(F64)
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"y must be [n_samples] or [n_samples, n_targets] with n_samples = {n} (as X), "
                         f"got shape {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values")
    return (y.unsqueeze(1), True) if y.dim() == 1 else (y, False)


def _layer_chunks(n_layers: int, bytes_per_layer: int, budget: int) -> list[slice]:
    step = max(1, budget // max(1, bytes_per_layer))
    return [slice(i, min(i + step, n_layers)) for i in range(0, n_layers, step)]


def _check_finite(x: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise ValueError("X contains NaN or infinite values")
    return x


def _per_layer_matmul(xl: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[L, n, d] @ [L, k, d]^T + [L, k] -> [L, n, k] in float64, one layer at a time (no float64 copy of all X)."""
    return torch.stack([xl[i].to(F64) @ w[i].T for i in range(len(w))]) + b[:, None, :]


def _check_width(xl: torch.Tensor, w: torch.Tensor) -> None:
    if xl.shape[0] != w.shape[0] or xl.shape[-1] != w.shape[-1]:
        raise ValueError(f"X has {xl.shape[0]} layer(s) of width {xl.shape[-1]}; the probe was fitted on "
                         f"{w.shape[0]} layer(s) of width {w.shape[-1]}")


def _ridge_loo(x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor, intercept: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leave-one-out ridge for a chunk of layers from one eigendecomposition per layer.

    x: [Lc, n, d] float64 (centred when ``intercept``; overwritten), y: [n, t] (centred likewise), alphas: [A].
    Returns the mean squared LOO error [Lc, A], the index of the best alpha [Lc] and its coefficients [Lc, t, d].

    With ``basis`` B and spectral factor f(alpha), fitted values are B diag(f) B^T y and the hat diagonal is
    (B*B) f (+ 1/n for the unpenalised intercept); the LOO residual is (y - fitted) / (1 - hat).
    Covariance side (n > d): B = X V, f = 1/(s + alpha). Gram side (n <= d): B = U, f = s/(s + alpha).
    """
    n_layers, n, d = x.shape
    cov_side = n > d
    s, vecs = torch.linalg.eigh(x.mT @ x if cov_side else x @ x.mT)
    s = s.clamp(min=0)
    basis = x @ vecs if cov_side else vecs  # [Lc, n, m]
    q = basis.mT @ y  # [Lc, m, t]
    denom = s[:, None, :] + alphas[None, :, None]  # [Lc, A, m]
    factor = 1.0 / denom if cov_side else s[:, None, :] / denom
    m, t, n_alphas = q.shape[1], q.shape[2], len(alphas)
    weighted = (factor[..., None] * q[:, None]).permute(0, 2, 1, 3).reshape(n_layers, m, n_alphas * t)
    fitted = (basis @ weighted).view(n_layers, n, n_alphas, t)
    squares = basis.square_() if cov_side else vecs.square()  # X V is spent; U is still needed
    hat = squares @ factor.mT + (1.0 / n if intercept else 0.0)  # [Lc, n, A]
    loo = (y[None, :, None, :] - fitted) / (1.0 - hat)[..., None]
    errors = loo.square().mean(dim=(1, 3))
    best = errors.argmin(dim=1)
    dual = q / (s + alphas[best][:, None])[..., None]  # [Lc, m, t]
    coef = vecs @ dual if cov_side else x.mT @ (vecs @ dual)  # [Lc, d, t]
    return errors, best, coef.mT


class RidgeProbe:
    """Ridge regression per layer, alpha chosen per layer by efficient leave-one-out CV (as ``RidgeCV``).

    One alpha per layer is shared by all targets: the one with the smallest mean squared LOO error over samples
    and targets (``RidgeCV(alpha_per_target=False)``), computed on standardised targets when
    ``standardize_targets`` so that each target weighs equally. Predictions are in the original target units.

    Fitted attributes (torch float64 tensors on X's device unless said otherwise), with L layers, t targets:

    - ``coef_``: [L, t, d]; the layer axis is dropped for 2-D X and the target axis for 1-D y (as scikit-learn);
    - ``intercept_``: [L, t], squeezed the same way (zeros without ``fit_intercept``);
    - ``alpha_``: numpy [L] (a float for 2-D X);
    - ``cv_mse_``: numpy [L, n_alphas] (``[n_alphas]`` for 2-D X), mean squared LOO error in standardised units;
    - ``y_mean_``, ``y_scale_``: [t] (t = 1 for 1-D y), the target standardisation (mean 0 without
      ``fit_intercept``, scale 1 without ``standardize_targets``).
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, fit_intercept: bool = True,
                 standardize_targets: bool = True, layer_chunk_bytes: int = 2 << 30):
        if len(alphas) == 0 or min(alphas) <= 0:
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
        self.alphas = tuple(float(a) for a in alphas)
        self.fit_intercept = fit_intercept
        self.standardize_targets = standardize_targets
        self.layer_chunk_bytes = layer_chunk_bytes

    def fit(self, X, y) -> "RidgeProbe":
        """Fit one probe per layer. X: [n, d] or [n, L, d] tensor (any device); y: [n] or [n, t]."""
        xl, layered = _layers_view(X)
        n_layers, n, d = xl.shape
        _check_samples(n)
        y, single = _targets(y, n, xl.device)
        self.y_mean_ = y.mean(0) if self.fit_intercept else torch.zeros_like(y[0])
        std = y.std(0, correction=0)
        self.y_scale_ = torch.where(std > 0, std, 1.0) if self.standardize_targets else torch.ones_like(std)
        ys = (y - self.y_mean_) / self.y_scale_
        alphas = torch.tensor(self.alphas, dtype=F64, device=xl.device)
        m = min(n, d)
        per_layer = 8 * (2 * n * d + 3 * m * m + 2 * n * len(alphas) * y.shape[1])
        coefs, intercepts, best, errors = [], [], [], []
        for chunk in _layer_chunks(n_layers, per_layer, self.layer_chunk_bytes):
            x = _check_finite(xl[chunk].to(F64, copy=True))  # a copy: centred in place below
            x_mean = x.mean(1, keepdim=True) if self.fit_intercept else torch.zeros_like(x[:, :1])
            x -= x_mean
            err, k, w = _ridge_loo(x, ys, alphas, self.fit_intercept)
            w = w * self.y_scale_[:, None]  # [Lc, t, d] in target units
            coefs.append(w)
            intercepts.append(self.y_mean_ - (w @ x_mean.mT).squeeze(-1))
            best.append(k)
            errors.append(err)
        self._coef, self._intercept = torch.cat(coefs), torch.cat(intercepts)
        self._single = single
        alpha = np.asarray(self.alphas)[torch.cat(best).cpu().numpy()]
        cv_mse = torch.cat(errors).cpu().numpy()
        self.alpha_ = alpha if layered else float(alpha[0])
        self.cv_mse_ = cv_mse if layered else cv_mse[0]
        coef, intercept = (self._coef, self._intercept) if layered else (self._coef[0], self._intercept[0])
        self.coef_ = coef.squeeze(-2) if single else coef
        self.intercept_ = intercept.squeeze(-1) if single else intercept
        self.n_features_in_ = d
        return self

    def _predict_layers(self, X) -> tuple[torch.Tensor, bool]:
        """[L, n, t] predictions, and whether X had a layer axis."""
        if not hasattr(self, "_coef"):
            raise RuntimeError("call fit() before predict() or score()")
        xl, layered = _layers_view(X)
        _check_width(xl, self._coef)
        return _per_layer_matmul(xl, self._coef, self._intercept), layered

    def predict(self, X) -> torch.Tensor:
        """Predictions in target units, float64: [L, n, t] for 3-D X, [n, t] for 2-D X; no t axis for 1-D y."""
        pred, layered = self._predict_layers(X)
        pred = pred if layered else pred[0]
        return pred.squeeze(-1) if self._single else pred

    def score(self, X, y) -> torch.Tensor | float:
        """R² per layer: a [L] tensor for 3-D X, a float for 2-D X. With several targets, the uniform average of
        the per-target R² (scikit-learn's ``r2_score``, ``multioutput='uniform_average'``)."""
        pred, layered = self._predict_layers(X)
        y, _ = _targets(y, pred.shape[1], pred.device)
        r2 = r2_score(y, pred)
        return r2 if layered else float(r2[0])


class LogisticProbe:
    """Binary logistic regression per layer with scikit-learn's objective for ``LogisticRegression(C=C)``:
    0.5·|w|² + C·Σ log-loss, intercept unpenalised. Newton steps (d+1 × d+1 Hessian per layer, float64) with a
    backtracking line search; a layer stops once a Newton step moves no sample's logit by more than ``tol``
    (a criterion that does not depend on the scale of the features).

    Fitted attributes (torch float64 on X's device): ``coef_`` [L, d] (``[d]`` for 2-D X), ``intercept_`` [L]
    (a 0-d tensor for 2-D X), ``n_iter_`` numpy [L] (an int for 2-D X).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-6, layer_chunk_bytes: int = 2 << 30):
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        self.C, self.max_iter, self.tol, self.layer_chunk_bytes = C, max_iter, tol, layer_chunk_bytes

    def fit(self, X, y) -> "LogisticProbe":
        """Fit one classifier per layer. X: [n, d] or [n, L, d] tensor; y: [n] labels in {0, 1}, both present."""
        xl, layered = _layers_view(X)
        n_layers, n, d = xl.shape
        _check_samples(n)
        y, single = _targets(y, n, xl.device)
        if not single or not torch.all((y == 0) | (y == 1)) or y.min() == y.max():
            raise ValueError("y must be a 1-D array of labels 0 and 1 with both labels present")
        y = y[:, 0]
        weights, iters = [], []
        for chunk in _layer_chunks(n_layers, 8 * (3 * n * (d + 1) + 3 * (d + 1) ** 2), self.layer_chunk_bytes):
            x = torch.ones(chunk.stop - chunk.start, n, d + 1, dtype=F64, device=xl.device)
            x[..., :d] = xl[chunk]
            w, it = self._newton(_check_finite(x), y)
            weights.append(w)
            iters.append(it)
        w, it = torch.cat(weights), torch.cat(iters).cpu().numpy()
        self._coef, self._intercept = w[:, :-1], w[:, -1]
        self.coef_ = self._coef if layered else self._coef[0]
        self.intercept_ = self._intercept if layered else self._intercept[0]
        self.n_iter_ = it if layered else int(it[0])
        self.n_features_in_ = d
        return self

    def _newton(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimise the objective for a chunk of layers; x: [Lc, n, d+1] with a ones column last."""
        n_layers, _, k = x.shape
        reg = torch.ones(k, dtype=F64, device=x.device)
        reg[-1] = 0.0  # the intercept is not penalised
        steps = 0.5 ** torch.arange(20, dtype=F64, device=x.device)  # line-search candidates 1, 1/2, ...
        w = torch.zeros(n_layers, k, dtype=F64, device=x.device)
        z = torch.zeros(n_layers, x.shape[1], dtype=F64, device=x.device)  # logits x @ w
        n_iter = torch.zeros(n_layers, dtype=torch.long, device=x.device)
        active = torch.ones(n_layers, dtype=torch.bool, device=x.device)

        def objective(logits: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
            return self.C * (torch.logaddexp(torch.zeros_like(logits), logits) - y * logits).sum(-1) + penalty

        for _ in range(self.max_iter):
            p = torch.sigmoid(z)
            grad = reg * w + self.C * (x.mT @ (p - y)[..., None]).squeeze(-1)
            hess = self.C * (x.mT @ (x * (p * (1 - p))[..., None]))
            hess.diagonal(dim1=-2, dim2=-1).add_(reg + 1e-10)
            step = torch.linalg.solve(hess, grad) * active[:, None]
            dz = (x @ step[..., None]).squeeze(-1)
            # objective at w - t*step for every candidate t: logits z - t*dz, penalty 0.5*|w - t*step|² (weights)
            ww, ws, ss = ((reg * a * b).sum(-1) for a, b in ((w, w), (w, step), (step, step)))
            f0 = objective(z, 0.5 * ww)
            ft = objective(z[:, None] - steps[:, None] * dz[:, None], 0.5 * (ww[:, None] - 2 * steps * ws[:, None]
                                                                           + steps ** 2 * ss[:, None]))
            decrease = 1e-4 * steps * (grad * step).sum(-1, keepdim=True)
            ok = ft <= f0[:, None] - decrease + 1e-12 * f0.abs()[:, None]  # roundoff slack near the optimum
            t = steps[torch.where(ok.any(1), ok.int().argmax(1), len(steps) - 1)]
            w = w - t[:, None] * step
            z = z - t[:, None] * dz
            n_iter += active
            active &= dz.abs().amax(1) > self.tol
            if not active.any():
                break
        return w, n_iter

    def decision_function(self, X) -> torch.Tensor:
        """Logits, float64: [L, n] for 3-D X, [n] for 2-D X."""
        if not hasattr(self, "_coef"):
            raise RuntimeError("call fit() before predicting or scoring")
        xl, layered = _layers_view(X)
        _check_width(xl, self._coef)
        z = _per_layer_matmul(xl, self._coef[:, None], self._intercept[:, None])[..., 0]
        return z if layered else z[0]

    def predict_proba(self, X) -> torch.Tensor:
        """Class probabilities as scikit-learn (columns P(0), P(1)): [L, n, 2] for 3-D X, [n, 2] for 2-D X."""
        p = torch.sigmoid(self.decision_function(X))
        return torch.stack([1 - p, p], dim=-1)

    def predict(self, X) -> torch.Tensor:
        """Labels 0/1 (int64): [L, n] for 3-D X, [n] for 2-D X."""
        return (self.decision_function(X) > 0).long()

    def score(self, X, y) -> torch.Tensor | float:
        """Accuracy per layer: a [L] float64 tensor for 3-D X, a float for 2-D X."""
        pred = self.predict(X)
        y, single = _targets(y, pred.shape[-1], pred.device)
        if not single:
            raise ValueError(f"y must be 1-D, got shape {tuple(y.shape)}")
        acc = (pred == y[:, 0]).to(F64).mean(-1)
        return acc if acc.dim() else float(acc)
