"""Gurnee & Tegmark's nonlinear probe, batched over layers and weight decays: one hidden layer of ReLU units trained
with AdamW, the weight decay chosen per layer on a validation split (``nonlinear_experiment.py`` of
wesg52/world-models, which ran one layer per model; here every layer in one call).

Each (layer, weight decay) pair is an independent MLP, but they train together: the weights are one tensor
``[L * W, d, hidden]`` and a step is two batched matmuls, on the device the activations live on. Adam and the
decoupled weight decay act elementwise, so training the stack equals training each MLP alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probes.linear import _layers_view, _targets
from probes.metrics import r2_score

WEIGHT_DECAYS = (0.01, 0.03, 0.1, 0.3)  # the paper's grid


def _linear_init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, device) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as ``nn.Linear`` initialises weights and biases."""
    bound = fan_in ** -0.5
    return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [M, b, d] -> [M, b, t] for M stacked MLPs."""
    w1, b1, w2, b2 = params
    return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1)), w2)


class MLPProbe:
    """One-hidden-layer MLP regression per layer (ReLU, ``hidden`` units), trained with AdamW on mini-batches;
    the weight decay is picked per layer from ``weight_decays`` by the lowest validation MSE.

    Inputs and targets are standardised on the training rows (so one learning rate suits every layer and target
    unit); predictions are in target units. A random ``val_fraction`` of the rows passed to ``fit`` is held out
    for early stopping (``patience`` epochs without a better validation loss stop a model, which keeps its best
    epoch's weights) and for choosing the weight decay. Seeded: the same data and seed give the same probe.

    Fitted attributes (L layers, t targets; torch tensors on X's device):

    - ``w1_`` [L, d, hidden], ``b1_`` [L, 1, hidden], ``w2_`` [L, hidden, t], ``b2_`` [L, 1, t] (standardised units);
    - ``x_mean_``, ``x_scale_`` [L, 1, d]; ``y_mean_``, ``y_scale_`` [t];
    - ``weight_decay_``: numpy [L] (a float for 2-D X); ``val_mse_``: numpy [L, W], best validation MSE per weight
      decay (standardised units); ``n_epochs_``: numpy [L, W], epochs run before stopping.
    """

    def __init__(self, hidden: int = 256, weight_decays: Sequence[float] = WEIGHT_DECAYS, lr: float = 1e-3,
                 epochs: int = 20, patience: int = 3, batch_size: int = 512, val_fraction: float = 0.1,
                 seed: int = 0):
        if not weight_decays or min(weight_decays) < 0:
            raise ValueError(f"weight_decays must be a non-empty list of non-negative numbers, got {weight_decays}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.hidden, self.weight_decays, self.lr = hidden, tuple(float(w) for w in weight_decays), lr
        self.epochs, self.patience, self.batch_size = epochs, patience, batch_size
        self.val_fraction, self.seed = val_fraction, seed

    def fit(self, X, y) -> "MLPProbe":
        """Train every (layer, weight decay) MLP together. X: [n, d] or [n, L, d]; y: [n] or [n, t]."""
        xl, layered = _layers_view(X)
        n_layers, n, d = xl.shape
        y, self._single = _targets(y, n, xl.device)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=gen).to(xl.device)
        n_val = max(1, int(round(self.val_fraction * n)))
        if n - n_val < 2:
            raise ValueError(f"need at least {n_val + 2} samples to fit with a validation split, got {n}")
        val, train = order[:n_val], order[n_val:]
        x = xl.float()
        self.x_mean_ = x[:, train].mean(1, keepdim=True)
        std = x[:, train].std(1, keepdim=True, correction=0)
        self.x_scale_ = torch.where(std > 0, std, 1.0)
        self.y_mean_, ys = y[train].mean(0), y[train].std(0, correction=0)
        self.y_scale_ = torch.where(ys > 0, ys, 1.0)
        xs = (x - self.x_mean_) / self.x_scale_  # [L, n, d]
        yz = ((y - self.y_mean_) / self.y_scale_).float()
        best, val_mse, epochs = self._train(xs, yz, train, val, gen)
        n_wd = len(self.weight_decays)
        pick = torch.as_tensor(val_mse.reshape(n_layers, n_wd).argmin(1))
        index = (torch.arange(n_layers) * n_wd + pick).to(xl.device)
        self.w1_, self.b1_, self.w2_, self.b2_ = (p[index] for p in best)
        self.val_mse_ = val_mse.reshape(n_layers, n_wd)
        self.n_epochs_ = epochs.reshape(n_layers, n_wd)
        chosen = np.asarray(self.weight_decays)[pick.numpy()]
        self.weight_decay_ = chosen if layered else float(chosen[0])
        self.n_features_in_ = d
        return self

    def _train(self, xs: torch.Tensor, yz: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
               gen: torch.Generator) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """Mini-batch AdamW with early stopping for the stack of L * W MLPs; returns each one's best-epoch
        weights, its best validation MSE and the epochs it ran."""
        n_layers, _, d = xs.shape
        n_wd, t, device = len(self.weight_decays), yz.shape[1], xs.device
        m = n_layers * n_wd
        params = [_linear_init((m, d, self.hidden), d, gen, device), _linear_init((m, 1, self.hidden), d, gen, device),
                  _linear_init((m, self.hidden, t), self.hidden, gen, device),
                  _linear_init((m, 1, t), self.hidden, gen, device)]
        decay = torch.tensor(self.weight_decays, device=device).repeat(n_layers)[:, None, None]
        optimizer = torch.optim.Adam(params, lr=self.lr)  # AdamW: the decoupled decay is applied below
        stack = lambda rows: xs[:, rows].repeat_interleave(n_wd, dim=0)  # noqa: E731  [m, b, d]
        x_val, y_val = stack(val), yz[val]
        best = [p.detach().clone() for p in params]
        best_loss = torch.full((m,), float("inf"), device=device)
        waited = torch.zeros(m, dtype=torch.long, device=device)
        epochs = torch.zeros(m, dtype=torch.long, device=device)
        for _ in range(self.epochs):
            active = waited < self.patience
            if not active.any():
                break
            for rows in train[torch.randperm(len(train), generator=gen).to(device)].split(self.batch_size):
                optimizer.zero_grad()
                loss = (_forward(params, stack(rows)) - yz[rows]).square().mean((1, 2)).sum()
                loss.backward()
                with torch.no_grad():
                    for p in params:
                        p.mul_(1 - self.lr * decay)
                optimizer.step()
            with torch.no_grad():
                current = (_forward(params, x_val) - y_val).square().mean((1, 2))
                better = active & (current < best_loss)
                for kept, p in zip(best, params, strict=True):
                    kept[better] = p[better]
                best_loss = torch.where(better, current, best_loss)
                waited = torch.where(better, 0, waited + active.long())
                epochs += active.long()
        return best, best_loss.cpu().numpy(), epochs.cpu().numpy()

    def _predict_layers(self, X) -> tuple[torch.Tensor, bool]:
        if not hasattr(self, "w1_"):
            raise RuntimeError("call fit() before predict() or score()")
        xl, layered = _layers_view(X)
        if xl.shape[0] != self.w1_.shape[0] or xl.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {xl.shape[0]} layer(s) of width {xl.shape[-1]}; the probe was fitted on "
                             f"{self.w1_.shape[0]} layer(s) of width {self.n_features_in_}")
        with torch.no_grad():
            out = _forward([self.w1_, self.b1_, self.w2_, self.b2_], (xl.float() - self.x_mean_) / self.x_scale_)
        return out.double() * self.y_scale_ + self.y_mean_, layered

    def predict(self, X) -> torch.Tensor:
        """Predictions in target units, float64: [L, n, t] for 3-D X, [n, t] for 2-D X; no t axis for 1-D y."""
        pred, layered = self._predict_layers(X)
        pred = pred if layered else pred[0]
        return pred.squeeze(-1) if self._single else pred

    def score(self, X, y) -> torch.Tensor | float:
        """R² per layer ([L] tensor for 3-D X, a float for 2-D X), averaged over targets as :func:`r2_score`."""
        pred, layered = self._predict_layers(X)
        y, _ = _targets(y, pred.shape[1], pred.device)
        r2 = r2_score(y, pred)
        return r2 if layered else float(r2[0])
