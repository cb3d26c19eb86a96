"""Linear probes fitted on the device that holds the activations, one probe per layer, all layers in one call.

- :class:`RidgeProbe` is scikit-learn's ``RidgeCV`` (efficient leave-one-out over a grid of alphas, unpenalised
  intercept, one alpha shared by all targets) batched over layers: one eigendecomposition per layer, in float64,
  serves every alpha.
- :class:`LogisticProbe` is scikit-learn's binary ``LogisticRegression(C=C)`` batched over layers, intercept
  unpenalised: with the L2 penalty (the default) fitted by damped Newton steps, with the L1 penalty (as SpARE's
  conflict probe; ``LogisticRegression(l1_ratio=1, C=C, solver="saga")``, formerly ``penalty="l1"``) by accelerated
  proximal gradient (FISTA), both in float64.

Activations come as ``[n_samples, d]`` (one layer) or ``[n_samples, n_layers, d]``; results that have a layer
axis put it first. Layers are processed in chunks that fit ``layer_chunk_bytes`` of float64 working memory.
The scikit-learn estimators stay the reference: ``tests/test_linear.py`` checks these against them.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from probes.metrics import r2_score

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 12))
F64 = torch.float64
PENALTIES = ("l2", "l1")
DEFAULT_MAX_ITER = {"l2": 100, "l1": 2000}


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
    """Binary logistic regression per layer with scikit-learn's objective for ``LogisticRegression(C=C)``: the
    penalty plus C·Σ log-loss, intercept unpenalised, the penalty 0.5·|w|² (``penalty="l2"``) or |w|₁
    (``penalty="l1"``, a sparse probe as SpARE's).

    - L2: Newton steps (d+1 × d+1 Hessian per layer, float64) with a backtracking line search; a layer stops once
      a Newton step moves no sample's logit by more than ``tol`` (a criterion that does not depend on the scale of
      the features). ``max_iter`` defaults to 100.
    - L1: FISTA (accelerated proximal gradient with soft-thresholding) in float64, all layers of a chunk at once,
      with monotone restarts and a step from a power-iteration Lipschitz bound, halved when a step fails the
      sufficient-decrease test. It works in centred, unit-variance coordinates u = s·w with the penalty weighted
      Σ|u_j|/s_j and the means folded into the intercept: the same objective in other coordinates (only the
      conditioning changes). Once a proximal step changes no coefficient in those coordinates (logit units per
      standard deviation of the feature) by more than ``tol``·max(1, largest coefficient), Newton steps on the
      support found, signs fixed, give the exact minimiser, which is kept if it passes the optimality conditions
      (signs unchanged, |gradient| <= penalty weight on every zero); otherwise FISTA goes on with a 100 times
      smaller threshold for that layer. ``max_iter`` (FISTA iterations) defaults to 2000; a layer that is not
      certified by then keeps FISTA's last iterate, with a ``RuntimeWarning`` (nearly separable data at large C
      converge slowly).

    Fitted attributes (torch float64 on X's device): ``coef_`` [L, d] (``[d]`` for 2-D X), ``intercept_`` [L]
    (a 0-d tensor for 2-D X), ``n_iter_`` numpy [L] (an int for 2-D X).
    """

    def __init__(self, C: float = 1.0, penalty: str = "l2", max_iter: int | None = None, tol: float = 1e-6,
                 layer_chunk_bytes: int = 2 << 30):
        if C <= 0:
            raise ValueError(f"C must be positive, got {C}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        max_iter = DEFAULT_MAX_ITER[penalty] if max_iter is None else max_iter
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.C, self.penalty, self.max_iter, self.tol = C, penalty, max_iter, tol
        self.layer_chunk_bytes = layer_chunk_bytes

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
            w, it = (self._newton if self.penalty == "l2" else self._l1)(_check_finite(x), y)
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
        """Minimise the L2 objective for a chunk of layers; x: [Lc, n, d+1] with a ones column last."""
        reg = torch.ones(x.shape[-1], dtype=F64, device=x.device)
        reg[-1] = 0.0  # the intercept is not penalised
        w, n_iter, _ = _newton_fit(x, y, self.C, reg, self.max_iter, self.tol)
        return w, n_iter

    def _l1(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimise |w|₁ + C·Σ log-loss for a chunk of layers; x: [Lc, n, d+1] with a ones column last (a copy:
        standardised in place). Returns [Lc, d+1] weights in X's units (intercept last) and the iterations [Lc].

        With the feature columns centred and scaled, x·w + b = z·u + b' for u = s·w and b' = b + mean·w, and
        |w|₁ = Σ|u_j|/s_j: the objective is unchanged, only better conditioned. A constant column gets u_j = 0."""
        feats = x[..., :-1]
        mean = feats.mean(1, keepdim=True)
        feats -= mean
        scale = feats.square().mean(1, keepdim=True).sqrt()
        constant = scale <= 1e-12 * mean.abs()  # what is left is the roundoff of the mean, not a variance
        feats.masked_fill_(constant, 0.0)
        scale = torch.where(constant, 1.0, scale)
        feats /= scale
        lam = torch.cat([1 / scale[:, 0], torch.zeros_like(scale[:, 0, :1])], 1)  # penalty weights; intercept free
        u, n_iter = _l1_solve(x, y, self.C, lam, self.max_iter, self.tol)
        w = u[:, :-1] / scale[:, 0]
        intercept = u[:, -1] - (w * mean[:, 0]).sum(-1)
        return torch.cat([w, intercept[:, None]], 1), n_iter

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


def _newton_fit(x: torch.Tensor, y: torch.Tensor, C: float, reg: torch.Tensor, max_iter: int, tol: float,
                w: torch.Tensor | None = None, lin: torch.Tensor | None = None, free: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise C·Σ log-loss(x·w) + 0.5·Σ reg·w² (+ Σ lin·w) by damped Newton steps for a chunk of layers, from
    ``w`` (zeros by default), moving only the coordinates where ``free`` (all by default) of the ``active`` layers
    (all by default). x: [Lc, n, k], reg: [k], lin and free: [Lc, k]. A layer stops once a step moves no logit by
    more than ``tol``.
    Returns w [Lc, k], the iterations [Lc] and which layers did not stop [Lc]."""
    n_layers, _, k = x.shape
    steps = 0.5 ** torch.arange(20, dtype=F64, device=x.device)  # line-search candidates 1, 1/2, ...
    w = torch.zeros(n_layers, k, dtype=F64, device=x.device) if w is None else w
    z = (x @ w[..., None]).squeeze(-1)  # logits x @ w
    n_iter = torch.zeros(n_layers, dtype=torch.long, device=x.device)
    active = torch.ones(n_layers, dtype=torch.bool, device=x.device) if active is None else active.clone()

    def objective(logits: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        return C * (torch.logaddexp(torch.zeros_like(logits), logits) - y * logits).sum(-1) + penalty

    for _ in range(max_iter):
        p = torch.sigmoid(z)
        grad = reg * w + C * (x.mT @ (p - y)[..., None]).squeeze(-1)
        hess = C * (x.mT @ (x * (p * (1 - p))[..., None]))
        if lin is not None:
            grad = (grad + lin) * free
            hess *= free[:, :, None] & free[:, None, :]
            hess.diagonal(dim1=-2, dim2=-1).add_(~free)  # fixed coordinates: a unit diagonal and no gradient
        hess.diagonal(dim1=-2, dim2=-1).add_(reg + 1e-10)
        step = torch.linalg.solve(hess, grad) * active[:, None]
        dz = (x @ step[..., None]).squeeze(-1)
        # objective at w - t*step for every candidate t: logits z - t*dz, penalty 0.5*|w - t*step|² (weights)
        ww, ws, ss = ((reg * a * b).sum(-1) for a, b in ((w, w), (w, step), (step, step)))
        pen0, pen_t = 0.5 * ww, 0.5 * (ww[:, None] - 2 * steps * ws[:, None] + steps ** 2 * ss[:, None])
        if lin is not None:  # plus lin·(w - t*step)
            lw, ls = (lin * w).sum(-1), (lin * step).sum(-1)
            pen0, pen_t = pen0 + lw, pen_t + lw[:, None] - steps * ls[:, None]
        f0 = objective(z, pen0)
        ft = objective(z[:, None] - steps[:, None] * dz[:, None], pen_t)
        decrease = 1e-4 * steps * (grad * step).sum(-1, keepdim=True)
        ok = ft <= f0[:, None] - decrease + 1e-12 * f0.abs()[:, None]  # roundoff slack near the optimum
        t = steps[torch.where(ok.any(1), ok.int().argmax(1), len(steps) - 1)]
        w = w - t[:, None] * step
        z = z - t[:, None] * dz
        n_iter += active
        active &= dz.abs().amax(1) > tol
        if not active.any():
            break
    return w, n_iter, active


def _top_eigenvalue(x: torch.Tensor, n_iter: int = 30) -> torch.Tensor:
    """Largest eigenvalue of x^T x per layer, x: [Lc, n, k], by power iteration from a seeded start (a lower bound,
    close after a few tens of iterations; :class:`_L1Fista` doubles its Lipschitz constant where it is too low)."""
    v = torch.randn(x.shape[0], x.shape[2], generator=torch.Generator().manual_seed(0), dtype=F64).to(x.device)
    for _ in range(n_iter):
        v = (x.mT @ (x @ v[..., None]))[..., 0]
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    return (x @ v[..., None]).square().sum((-2, -1))


class _L1Fista:
    """FISTA for C·Σ log-loss(x·u) + Σ lam·|u| on a chunk of layers; x: [Lc, n, k], lam: [Lc, k] penalty weights.

    Each :meth:`step` takes a proximal gradient step (soft-thresholding) from the extrapolated point v with step
    1/lip, lip starting at C/4 times the largest eigenvalue of x^T x (the log-loss's curvature is at most 1/4).
    A step that fails the sufficient-decrease test doubles the layer's lip and is retried; one that raises the
    objective resets the momentum instead (monotone restart), so the objective never rises.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, C: float, lam: torch.Tensor):
        n_layers, n, k = x.shape
        self.x, self.y, self.C, self.lam = x, y, C, lam
        self.lip = C / 4 * _top_eigenvalue(x)
        self.u, self.u_prev = (torch.zeros(n_layers, k, dtype=F64, device=x.device) for _ in range(2))
        self.z, self.z_prev = (torch.zeros(n_layers, n, dtype=F64, device=x.device) for _ in range(2))  # x·u
        self.f = self.smooth(self.z)  # the objective at u
        self.t = torch.ones(n_layers, dtype=F64, device=x.device)  # the momentum sequence

    def smooth(self, z: torch.Tensor) -> torch.Tensor:
        return self.C * (torch.logaddexp(torch.zeros_like(z), z) - self.y * z).sum(-1)

    def step(self, active: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
        """One iteration for the ``active`` layers [Lc]. Returns the layers whose proximal step changed no
        coordinate by more than ``tol`` [Lc]·max(1, largest coordinate): v is then near a fixed point."""
        x, lam, lip = self.x, self.lam, self.lip
        t_next = (1 + (1 + 4 * self.t * self.t).sqrt()) / 2
        beta = (self.t - 1) / t_next
        v = self.u + beta[:, None] * (self.u - self.u_prev)
        zv = self.z + beta[:, None] * (self.z - self.z_prev)
        fv = self.smooth(zv)
        grad = self.C * (x.mT @ (torch.sigmoid(zv) - self.y)[..., None])[..., 0]
        cand = v - grad / lip[:, None]
        cand = cand.sign() * (cand.abs() - lam / lip[:, None]).clamp(min=0)
        delta = cand - v
        z_cand = (x @ cand[..., None])[..., 0]
        f_smooth = self.smooth(z_cand)
        fits = f_smooth <= fv + (grad * delta).sum(-1) + lip / 2 * delta.square().sum(-1) + 1e-12 * fv.abs()
        f_cand = f_smooth + (lam * cand.abs()).sum(-1)
        small = fits & (delta.abs().amax(-1) <= tol * cand.abs().amax(-1).clamp(min=1.0))
        take = active & fits & ((f_cand <= self.f) | small | (beta == 0))
        restart = active & fits & ~take
        move, keep = take[:, None], (take | restart)[:, None]
        self.u_prev, self.u = torch.where(keep, self.u, self.u_prev), torch.where(move, cand, self.u)
        self.z_prev, self.z = torch.where(keep, self.z, self.z_prev), torch.where(move, z_cand, self.z)
        self.f = torch.where(take, f_cand, self.f)
        self.t = torch.where(take, t_next, torch.where(restart, 1.0, self.t))
        self.lip = torch.where(active & ~fits, 2 * lip, lip)
        return active & small


def _l1_polish(x: torch.Tensor, y: torch.Tensor, C: float, u: torch.Tensor, lam: torch.Tensor, which: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton steps from u on its support with the signs fixed (there the objective is smooth: C·Σ log-loss +
    Σ lam·sign·u), then a check of the optimality conditions: no sign changed and every zero coordinate has
    |gradient of the log-loss part| <= lam. Only the layers in ``which`` [Lc] are computed (their Hessians are the
    cost). Returns the polished u [Lc, k] and the layers where it is the exact minimiser [Lc] (the others keep
    improving by FISTA)."""
    idx = which.nonzero()[:, 0]
    xs, us, lams = x[idx], u[idx], lam[idx]
    support = us != 0
    support[:, -1] = True  # the intercept is always free
    sign = us.sign()
    polished, _, unfinished = _newton_fit(xs, y, C, torch.zeros_like(us[0]), 50, 1e-10, w=us, lin=lams * sign,
                                          free=support)
    grad = C * (xs.mT @ (torch.sigmoid(xs @ polished[..., None])[..., 0] - y)[..., None])[..., 0]
    kept_signs = ((polished.sign() == sign) | ~support)[:, :-1].all(-1)
    zeros_optimal = ((grad.abs() <= lams * (1 + 1e-6) + 1e-13 * C * x.shape[1]) | support).all(-1)
    out, exact = u.clone(), torch.zeros_like(which)
    out[idx], exact[idx] = polished, ~unfinished & kept_signs & zeros_optimal
    return out, exact


def _l1_solve(x: torch.Tensor, y: torch.Tensor, C: float, lam: torch.Tensor, max_iter: int, tol: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise C·Σ log-loss(x·u) + Σ lam·|u| for a chunk of layers; x: [Lc, n, k], lam: [Lc, k].

    FISTA finds the support; once its steps fall below ``tol`` a Newton polish on that support gives the exact
    minimiser if the optimality conditions hold there (:func:`_l1_polish`); if not, FISTA goes on with a 100 times
    smaller threshold for that layer. After ``max_iter`` FISTA iterations a layer keeps its polished point if
    certified, else FISTA's. Returns u [Lc, k] and the FISTA iterations [Lc]."""
    n_layers = x.shape[0]
    fista = _L1Fista(x, y, C, lam)
    threshold = torch.full((n_layers,), float(tol), dtype=F64, device=x.device)
    done = torch.zeros(n_layers, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(n_layers, dtype=torch.long, device=x.device)
    u = torch.zeros_like(fista.u)
    for it in range(max_iter):
        small = fista.step(~done, threshold)
        n_iter += ~done
        attempt = ~done if it == max_iter - 1 else small
        if attempt.any():
            polished, exact = _l1_polish(x, y, C, fista.u, lam, attempt)
            accept = attempt & exact
            u = torch.where(accept[:, None], polished, u)
            done |= accept
            threshold = torch.where(attempt & ~exact, threshold / 100, threshold)
        if done.all():
            break
    if not done.all():
        warnings.warn(f"LogisticProbe(penalty='l1'): {int((~done).sum())} of {n_layers} layer(s) did not converge in "
                      f"max_iter={max_iter} iterations (n_iter_ == max_iter); their fit is FISTA's last iterate. "
                      "Raise max_iter, or lower C (a nearly separable problem converges slowly).", RuntimeWarning,
                      stacklevel=4)
    return torch.where(done[:, None], u, fista.u), n_iter
