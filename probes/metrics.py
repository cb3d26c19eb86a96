"""Scores for probes, computed in torch on the device of the inputs (float64)."""

from __future__ import annotations

import torch

EARTH_RADIUS_KM = 6371.0


def _t(x) -> torch.Tensor:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def _pair(y_true, y_pred) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _t(y_true), _t(y_pred)
    b = b.to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"y_true {tuple(a.shape)} and y_pred {tuple(b.shape)} differ in shape")
    if a.shape[0] < 2:
        raise ValueError("need at least 2 samples")
    return (a.unsqueeze(1), b.unsqueeze(1)) if a.dim() == 1 else (a, b)


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination, averaged uniformly over targets (scikit-learn's ``r2_score``)."""
    a, b = _pair(y_true, y_pred)
    ss_res = ((a - b) ** 2).sum(0)
    ss_tot = ((a - a.mean(0)) ** 2).sum(0)
    return float((1 - ss_res / ss_tot.clamp(min=1e-300)).mean())


def pearson(x, y) -> float:
    a, b = _pair(x, y)
    a, b = a[:, 0] - a[:, 0].mean(), b[:, 0] - b[:, 0].mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks starting at 1, ties given their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype, device=x.device)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts)[inverse]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D arrays."""
    a, b = _pair(x, y)
    return pearson(_ranks(a[:, 0]), _ranks(b[:, 0]))


def haversine_km(lat1, lon1, lat2, lon2) -> torch.Tensor:
    """Great-circle distance in km between points given in degrees (broadcasting)."""
    lat1, lon1, lat2, lon2 = (torch.deg2rad(_t(v)) for v in (lat1, lon1, lat2, lon2))
    h = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(h.clamp(0, 1).sqrt())


def proximity_error(pred, true, chunk: int = 2048) -> torch.Tensor:
    """Per entity: the fraction of entities whose true position is closer to its true position than its prediction.

    Gurnee & Tegmark's error measure, robust to the spread of each dataset: 0 is perfect. Positions are
    [n, 2] latitude/longitude (great-circle distance) or [n] / [n, 1] times (absolute difference).
    """
    p, t = _pair(true, pred)[::-1]
    if t.shape[1] == 2:
        def dist(a, b):
            return haversine_km(a[..., 0], a[..., 1], b[..., 0], b[..., 1])
    elif t.shape[1] == 1:
        def dist(a, b):
            return (a[..., 0] - b[..., 0]).abs()
    else:
        raise ValueError(f"positions must have 1 (time) or 2 (latitude, longitude) columns, got {t.shape[1]}")
    errors = dist(p, t)  # [n]
    out = torch.empty_like(errors)
    for start in range(0, len(t), chunk):  # rows in chunks: never an n x n matrix
        rows = slice(start, start + chunk)
        between = dist(t[rows, None, :], t[None, :, :])  # [chunk, n]
        out[rows] = (between < errors[rows, None]).double().mean(1)
    return out
