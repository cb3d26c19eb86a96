"""Linear probes fitted on the device that holds the activations, for every layer at once.

:class:`RidgeProbe` follows scikit-learn's ``RidgeCV`` (efficient leave-one-out over a grid of alphas, unpenalised
intercept, one alpha shared by all targets), with one eigendecomposition per layer serving every alpha, in float64.
The scikit-learn estimator stays the reference: ``tests/test_linear.py`` checks this one against it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 12))


def _as_layers(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """[n, d] or [n, L, d] -> a [L, n, d] view, and whether the input had a layer axis."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() == 2:
        return x.unsqueeze(0), False
    if x.dim() == 3:
        return x.transpose(0, 1), True
    raise ValueError(f"X must be [n_samples, d] or [n_samples, n_layers, d], got shape {tuple(x.shape)}")


def _as_targets(y, n: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, device=device, dtype=torch.float64)
    single = y.dim() == 1
    y = y.unsqueeze(1) if single else y
    if y.dim() != 2 or y.shape[0] != n:
        raise ValueError(f"y must be [n_samples] or [n_samples, n_targets] with n_samples = {n}, got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite values")
    return y, single


class RidgeProbe:
    """Ridge regression per layer with leave-one-out choice of alpha, targets standardised.

    Fitted attributes: ``coef_`` [n_layers, n_targets, d] (``[n_targets, d]`` / ``[d]`` without a layer axis or with
    one target, as in scikit-learn), ``intercept_``, ``alpha_`` (one per layer), ``cv_mse_`` [n_layers, n_alphas]
    (mean squared leave-one-out error of the standardised targets).
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, standardize_targets: bool = True,
                 layer_chunk_bytes: int = 2 << 30):
        if len(alphas) == 0 or min(alphas) <= 0:
            raise ValueError(f"alphas must be positive, got {alphas}")
        self.alphas = tuple(float(a) for a in alphas)
        self.standardize_targets = standardize_targets
        self.layer_chunk_bytes = layer_chunk_bytes

    def fit(self, X: torch.Tensor, y) -> "RidgeProbe":
        xl, self._layered = _as_layers(X)
        n_layers, n, d = xl.shape
        if n < 2:
            raise ValueError(f"need at least 2 samples to fit, got {n}")
        y, self._single = _as_targets(y, n, xl.device)
        self.y_mean_ = y.mean(0)
        self.y_scale_ = y.std(0, unbiased=False).clamp(min=1e-12) if self.standardize_targets else torch.ones_like(
            self.y_mean_)
        ys = (y - self.y_mean_) / self.y_scale_
        alphas = torch.tensor(self.alphas, dtype=torch.float64, device=xl.device)
        coefs, intercepts, best, mse = [], [], [], []
        for layer in range(n_layers):
            x = xl[layer].to(torch.float64)
            mean = x.mean(0)
            coef, errors = self._fit_layer(x - mean, ys, alphas)
            k = int(torch.argmin(errors))
            w = coef[k] * self.y_scale_[:, None]  # [t, d] in target units
            coefs.append(w)
            intercepts.append(self.y_mean_ - w @ mean)
            best.append(self.alphas[k])
            mse.append(errors)
        self._coef = torch.stack(coefs)  # [L, t, d]
        self._intercept = torch.stack(intercepts)  # [L, t]
        self.alpha_ = np.array(best)
        self.cv_mse_ = torch.stack(mse).cpu().numpy()
        self.n_features_in_ = d
        return self

    @staticmethod
    def _fit_layer(xc: torch.Tensor, ys: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients [n_alphas, t, d] and mean LOO squared error [n_alphas] from one eigendecomposition."""
        n, d = xc.shape
        yc = ys - ys.mean(0)
        if n > d:
            s, v = torch.linalg.eigh(xc.T @ xc)  # covariance side: d x d
            s = s.clamp(min=0)
            z = xc @ v  # [n, d]
            inv = 1.0 / (s[None, :] + alphas[:, None])  # [A, d]
            q = z.T @ yc  # [d, t]
            fitted = torch.einsum("nd,ad,dt->ant", z, inv, q)
            hat = 1.0 / n + (z * z) @ inv.T  # [n, A]
            coef = torch.einsum("ed,ad,dt->ate", v, inv, q)
        else:
            s, u = torch.linalg.eigh(xc @ xc.T)  # Gram side: n x n
            s = s.clamp(min=0)
            shrink = s[None, :] / (s[None, :] + alphas[:, None])  # [A, n]
            q = u.T @ yc  # [n, t]
            fitted = torch.einsum("ij,aj,jt->ait", u, shrink, q)
            hat = 1.0 / n + (u * u) @ shrink.T
            dual = torch.einsum("ij,aj,jt->ait", u, 1.0 / (s[None, :] + alphas[:, None]), q)  # [A, n, t]
            coef = torch.einsum("nd,ant->atd", xc, dual)
        loo = (yc[None] - fitted) / (1.0 - hat.T)[:, :, None]
        return coef, (loo ** 2).mean(dim=(1, 2))

    def _check_fitted(self) -> None:
        if not hasattr(self, "_coef"):
            raise RuntimeError("call fit() before predict() or score()")

    @property
    def coef_(self) -> torch.Tensor:
        self._check_fitted()
        c = self._coef if self._layered else self._coef[0]
        return c.squeeze(-2) if self._single else c

    @property
    def intercept_(self) -> torch.Tensor:
        self._check_fitted()
        b = self._intercept if self._layered else self._intercept[0]
        return b.squeeze(-1) if self._single else b

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Predictions in target units: [n_layers, n, n_targets] for layered input, else [n, n_targets] (1-D y: no
        target axis)."""
        self._check_fitted()
        xl, layered = _as_layers(X)
        if xl.shape[0] != self._coef.shape[0] or xl.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {xl.shape[0]} layers of width {xl.shape[-1]}; the probe was fitted on "
                             f"{self._coef.shape[0]} of width {self.n_features_in_}")
        pred = torch.einsum("lnd,ltd->lnt", xl.to(torch.float64), self._coef) + self._intercept[:, None, :]
        pred = pred if layered else pred[0]
        return pred.squeeze(-1) if self._single else pred

    def score(self, X: torch.Tensor, y) -> torch.Tensor | float:
        """R² per layer (uniform average over targets, as scikit-learn's ``r2_score``)."""
        from probes.metrics import r2_score

        pred = self.predict(X)
        xl, layered = _as_layers(X)
        y, _ = _as_targets(y, xl.shape[1], xl.device)
        if not layered:
            return r2_score(y, pred.reshape(y.shape))
        return torch.tensor([r2_score(y, p.reshape(y.shape)) for p in pred])


class LogisticProbe:
    """Binary L2-regularised logistic regression per layer (scikit-learn's objective: 0.5·|w|² + C·Σ log-loss,
    intercept unpenalised), fitted by Newton's method in float64 on the device.

    Fitted attributes: ``coef_`` [n_layers, d] (``[d]`` without a layer axis), ``intercept_``, ``n_iter_``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 50, tol: float = 1e-8):
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        self.C, self.max_iter, self.tol = C, max_iter, tol

    def fit(self, X: torch.Tensor, y) -> "LogisticProbe":
        xl, self._layered = _as_layers(X)
        n_layers, n, d = xl.shape
        y, single = _as_targets(y, n, xl.device)
        if not single or not torch.all((y == 0) | (y == 1)) or y.unique().numel() != 2:
            raise ValueError("y must be a 1-D array of both labels 0 and 1")
        y = y[:, 0]
        weights, iters = [], []
        for layer in range(n_layers):
            x = torch.cat([xl[layer].to(torch.float64), torch.ones(n, 1, dtype=torch.float64, device=xl.device)], 1)
            w = torch.zeros(d + 1, dtype=torch.float64, device=xl.device)
            reg = torch.ones(d + 1, dtype=torch.float64, device=xl.device)
            reg[-1] = 0.0  # the intercept is not penalised
            for it in range(1, self.max_iter + 1):
                p = torch.sigmoid(x @ w)
                grad = reg * w + self.C * x.T @ (p - y)
                hess = torch.diag(reg + 1e-10) + self.C * (x.T * (p * (1 - p))) @ x
                step = torch.linalg.solve(hess, grad)
                w = w - step
                if step.abs().max() < self.tol:
                    break
            weights.append(w)
            iters.append(it)
        w = torch.stack(weights)
        self._coef, self._intercept = w[:, :-1], w[:, -1]
        self.n_iter_ = np.array(iters)
        return self

    @property
    def coef_(self) -> torch.Tensor:
        return self._coef if self._layered else self._coef[0]

    @property
    def intercept_(self) -> torch.Tensor:
        return self._intercept if self._layered else self._intercept[0]

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        xl, layered = _as_layers(X)
        if xl.shape[0] != self._coef.shape[0] or xl.shape[-1] != self._coef.shape[-1]:
            raise ValueError(f"X has {xl.shape[0]} layers of width {xl.shape[-1]}; the probe was fitted on "
                             f"{self._coef.shape[0]} of width {self._coef.shape[-1]}")
        z = torch.einsum("lnd,ld->ln", xl.to(torch.float64), self._coef) + self._intercept[:, None]
        return z if layered else z[0]

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """Probability of label 1: [n_layers, n] or [n]."""
        return torch.sigmoid(self.decision_function(X))

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return (self.decision_function(X) > 0).long()

    def score(self, X: torch.Tensor, y) -> torch.Tensor | float:
        """Accuracy per layer."""
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(self._coef.device)
        acc = (self.predict(X) == y.long()).double().mean(-1)
        return acc if acc.dim() else float(acc)
