"""How many dimensions carry a probe's signal: ridge probes on the top-k principal components of the activations,
for several k at once and every layer (``paper_results/pca.ipynb`` of wesg52/world-models).

The components come from the training rows only (centred on their mean), one SVD per layer serving every k; the
ridge probe on k components is :class:`probes.linear.RidgeProbe` (alpha by leave-one-out). With k = d the probe
reads the whole space, so its R² is the plain ridge probe's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probes.linear import DEFAULT_ALPHAS, F64, RidgeProbe, _layers_view

PCA_KS = (1, 2, 5, 10, 20, 50, 100, 200)  # d_model is added: the full space


def usable_ks(ks: Sequence[int], d: int, n_train: int) -> list[int]:
    """The ks no larger than the width or the training rows, and the width itself, sorted and unique."""
    return sorted({k for k in ks if k <= min(d, n_train)} | {min(d, n_train)})


class PCAProbe:
    """Ridge probes per layer on the top-k principal components of the training activations, for each k in
    ``ks`` (those above ``min(d, n_train)`` are dropped and ``min(d, n_train)`` is added: :func:`usable_ks`).

    Fitted attributes (torch float64 on X's device, L layers): ``ks_`` (list), ``mean_`` [L, 1, d],
    ``components_`` [L, d, m] (columns are components, strongest first, m = max k), ``explained_variance_ratio_``
    numpy [K, L] (the fraction of the training variance in the top k), ``probes_`` (one fitted RidgeProbe per k).
    """

    def __init__(self, ks: Sequence[int] = PCA_KS, alphas: Sequence[float] = DEFAULT_ALPHAS):
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.ks, self.alphas = tuple(int(k) for k in ks), tuple(alphas)

    def fit(self, X, y) -> "PCAProbe":
        """X: [n, d] or [n, L, d]; y: [n] or [n, t]."""
        xl, _ = _layers_view(X)
        _, n, d = xl.shape
        self.ks_ = usable_ks(self.ks, d, n)
        x = xl.to(F64)
        self.mean_ = x.mean(1, keepdim=True)
        _, s, vh = torch.linalg.svd(x - self.mean_, full_matrices=False)  # vh: [L, min(n, d), d]
        self.components_ = vh[:, : self.ks_[-1]].mT
        share = s.square() / s.square().sum(1, keepdim=True).clamp(min=1e-300)
        cumulative = share.cumsum(1).cpu().numpy()  # [L, m]
        self.explained_variance_ratio_ = np.stack([cumulative[:, k - 1] for k in self.ks_])
        self.probes_ = [RidgeProbe(self.alphas).fit(self._project(x, k), y) for k in self.ks_]
        return self

    def _project(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[L, n, d] -> [n, L, k] scores on the top k components."""
        return ((x - self.mean_) @ self.components_[..., :k]).transpose(0, 1)

    def predict(self, X) -> torch.Tensor:
        """Predictions for every k: [K, L, n, t] for 3-D X, [K, n, t] for 2-D X (no t axis for 1-D y)."""
        if not hasattr(self, "probes_"):
            raise RuntimeError("call fit() before predict()")
        xl, layered = _layers_view(X)
        x = xl.to(F64)
        preds = torch.stack([probe.predict(self._project(x, k))
                             for k, probe in zip(self.ks_, self.probes_, strict=True)])
        return preds if layered else preds[:, 0]
