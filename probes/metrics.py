"""Scores for probes, computed in float64 torch on the device of the inputs (numpy arrays and lists go to the CPU,
or to the device of the first tensor argument): R², correlations, proximity error, AUROC and AUPRC of classifier
scores (one row per layer at once), bootstrap intervals over rows or held-out groups; and open-domain-QA exact
match of short answers."""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

import numpy as np
import torch

EARTH_RADIUS_KM = 6371.0
F64 = torch.float64


def _f64(x, device: torch.device | None = None) -> torch.Tensor:
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return x.to(device=device if device is not None else x.device, dtype=F64)


def _vectors(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1-D float64 tensors of the same length >= 2 on x's device."""
    a = _f64(x)
    b = _f64(y, a.device)
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"expected two 1-D arrays of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2:
        raise ValueError(f"need at least 2 samples, got {len(a)}")
    return a, b


def r2_score(y_true, y_pred) -> torch.Tensor | float:
    """Coefficient of determination as scikit-learn's ``r2_score`` (``multioutput='uniform_average'``): with
    several targets, the mean of the per-target R². A constant target scores 1 if predicted exactly, else 0.

    y_true: [n] or [n, t]. y_pred: the same shape (returns a float), or with a leading layer axis, [L, n] or
    [L, n, t] (returns a float64 tensor [L] on y_true's device).
    """
    t = _f64(y_true)
    p = _f64(y_pred, t.device)
    batched = p.dim() == t.dim() + 1
    if t.dim() not in (1, 2) or (p.shape[1:] if batched else p.shape) != t.shape:
        raise ValueError(f"y_pred {tuple(p.shape)} must be y_true's shape {tuple(t.shape)} ([n] or [n, t]), "
                         "optionally with a leading layer axis")
    if t.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {t.shape[0]}")
    r2 = _r2(t.reshape(t.shape[0], -1), p.reshape(*p.shape[: 1 + batched], -1))
    return r2 if batched else float(r2)


def _r2(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """R² over the rows axis (-2) averaged over the targets (-1) of t [..., n, k] and p (broadcasting to it): one
    computation for :func:`r2_score` and each resample of :func:`bootstrap_r2`."""
    ss_res = (t - p).square().sum(-2)  # [..., k]
    ss_tot = (t - t.mean(-2, keepdim=True)).square().sum(-2)  # [..., k]
    exact = torch.where(ss_res == 0, 1.0, 0.0).to(F64)
    return torch.where(ss_tot > 0, 1 - ss_res / torch.where(ss_tot > 0, ss_tot, 1.0), exact).mean(-1)


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays (NaN when one is constant, as scipy)."""
    a, b = _vectors(x, y)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties given their average rank (scipy.stats.rankdata's default)."""
    order = torch.argsort(x)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(F64)  # rank of the last member of each tie group
    ranks = torch.empty_like(x)
    ranks[order] = (ends - (counts - 1) / 2)[group]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D arrays, average ranks for ties (as scipy.stats.spearmanr)."""
    a, b = _vectors(x, y)
    return pearson(_ranks(a), _ranks(b))


def haversine_km(lat1, lon1, lat2, lon2) -> torch.Tensor:
    """Great-circle distance in km between points given in degrees (broadcasting), on a sphere of radius 6371 km.
    Computed on the device of the first tensor argument."""
    device = next((v.device for v in (lat1, lon1, lat2, lon2) if isinstance(v, torch.Tensor)), None)
    lat1, lon1, lat2, lon2 = (torch.deg2rad(_f64(v, device)) for v in (lat1, lon1, lat2, lon2))
    h = torch.sin((lat2 - lat1) / 2) ** 2 + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(h.clamp(0, 1).sqrt())


def _unit_vectors(lat_lon: torch.Tensor) -> torch.Tensor:
    lat, lon = torch.deg2rad(lat_lon[:, 0]), torch.deg2rad(lat_lon[:, 1])
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=1)


def proximity_error(pred, true, max_block: int = 1 << 24) -> torch.Tensor:
    """Gurnee & Tegmark's proximity error of each entity, a float64 tensor [n] on true's device (0 is perfect).

    For entity i: the fraction of the *other* n-1 entities whose true position is closer to i's true position
    than i's prediction is (strictly closer). It measures an error relative to how crowded the neighbourhood is,
    so datasets of different spread compare. Positions are [n, 2] latitude/longitude in degrees (great-circle
    distance; ranked through dot products of unit vectors, which order points exactly as the haversine distance
    does) or [n] / [n, 1] times (absolute difference). Rows are processed in blocks of ``max_block`` pairs, so no
    n x n matrix is formed.
    """
    t = _f64(true)
    p = _f64(pred, t.device)
    if p.shape != t.shape or t.dim() not in (1, 2):
        raise ValueError(f"pred {tuple(p.shape)} and true {tuple(t.shape)} must both be [n] or [n, 1] (times) "
                         "or [n, 2] (latitude, longitude)")
    n = t.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 entities, got {n}")
    t, p = t.reshape(n, -1), p.reshape(n, -1)
    if t.shape[1] == 2:
        true_u, pred_u = _unit_vectors(t), _unit_vectors(p)
        own = (true_u * pred_u).sum(1)  # cosine of each prediction's angular error

        def closer(rows: torch.Tensor) -> torch.Tensor:
            return true_u[rows] @ true_u.T > own[rows, None]
    elif t.shape[1] == 1:
        times, own = t[:, 0], (p[:, 0] - t[:, 0]).abs()

        def closer(rows: torch.Tensor) -> torch.Tensor:
            return (times[rows, None] - times[None, :]).abs() < own[rows, None]
    else:
        raise ValueError(f"positions must have 1 (time) or 2 (latitude, longitude) columns, got {t.shape[1]}")
    counts = torch.empty(n, dtype=F64, device=t.device)
    block = max(1, max_block // n)
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=t.device)
        hits = closer(rows)
        hits[torch.arange(len(rows), device=t.device), rows] = False  # not the entity itself
        counts[rows] = hits.sum(1).to(F64)
    return counts / (n - 1)


Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): unlike the normal approximation it stays inside
    [0, 1] and is not empty at 0 or n successes, which matters for rates on a few dozen prompts."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_with_interval(outcomes) -> dict:
    """A rate over per-prompt yes/no outcomes with its n and 95% Wilson interval (the form results.json uses)."""
    hits = [bool(x) for x in outcomes]
    low, high = wilson_interval(sum(hits), len(hits))
    return {"rate": sum(hits) / len(hits), "successes": sum(hits), "n": len(hits), "ci95": [low, high]}


def paired_bootstrap(a, b, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``a`` minus mean of ``b`` over the same prompts (per-prompt scores, e.g. 0/1 outcomes of two methods)
    with a 95% percentile interval from resampling the prompts (seeded, so reruns agree), and whether it excludes 0:
    a difference inside the interval's reach of 0 is not larger than the noise of this many prompts."""
    x, y = _f64(a).flatten(), _f64(b).flatten()
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"need paired scores of the same non-zero length, got {len(x)} and {len(y)}")
    diff = x - y
    low, high = _percentile_interval(diff[_resample_rows(len(diff), n_resamples, seed, diff.device)].mean(1))
    return {"difference": float(diff.mean()), "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0),
            "n": len(diff), "n_resamples": n_resamples, "seed": seed}


def bootstrap_r2(y_true, y_pred, n_resamples: int = 2000, seed: int = 0, max_block: int = 1 << 22) -> dict:
    """Test R² of predictions (exactly :func:`r2_score`: the mean of the per-target R² for e.g. latitude and
    longitude) with a 95% percentile interval from resampling the test rows with replacement (seeded, so reruns
    agree): how much the R² of a probe would move on another test split of this many entities.

    y_true and y_pred: [n] or [n, t], the same shape, n >= 2. Resamples are scored in blocks of at most
    ``max_block`` values, so memory stays bounded for large test splits. Returns ``{"r2", "ci95": [low, high],
    "n", "n_resamples", "seed"}``.
    """
    t = _f64(y_true)
    p = _f64(y_pred, t.device)
    if p.shape != t.shape:
        raise ValueError(f"y_pred {tuple(p.shape)} must have y_true's shape {tuple(t.shape)}")
    r2 = r2_score(t, p)  # also refuses other than [n] / [n, t] and fewer than 2 rows
    t, p = t.reshape(len(t), -1), p.reshape(len(p), -1)
    rows = _resample_rows(len(t), n_resamples, seed, t.device)
    per_block = max(1, max_block // t.numel())
    low, high = _percentile_interval(torch.cat([_r2(t[r], p[r]) for r in rows.split(per_block)]))
    return {"r2": r2, "ci95": [low, high], "n": len(t), "n_resamples": n_resamples, "seed": seed}


def _resample_rows(n: int, n_resamples: int, seed: int, device: torch.device) -> torch.Tensor:
    """Row indices [n_resamples, n] drawn with replacement from a seeded CPU generator (the same draws on every
    device), moved to ``device``."""
    if n_resamples < 1:
        raise ValueError(f"need at least 1 resample, got {n_resamples}")
    return torch.randint(n, (n_resamples, n), generator=torch.Generator().manual_seed(seed)).to(device)


def _percentile_interval(values: torch.Tensor) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles (linear interpolation, as numpy's default) of the resampled statistics."""
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=F64, device=values.device))
    return float(low), float(high)


# ------------------------------------------------------------------------------------------ classification areas

AREAS = ("auroc", "auprc")


def roc_auc(scores, labels) -> torch.Tensor | float:
    """Area under the ROC curve, exactly scikit-learn's ``roc_auc_score``: the chance that a positive scores above
    a negative, a tie counting one half (average ranks). scores: [n] (returns a float) or [L, n], one row per layer
    (returns a float64 tensor [L] on the scores' device); labels: 0/1, [n] shared by all rows or one per row."""
    return _area(scores, labels, "auroc")


def average_precision(scores, labels) -> torch.Tensor | float:
    """Average precision, exactly scikit-learn's ``average_precision_score``: Σ_k (R_k - R_(k-1))·P_k over the
    distinct scores as thresholds, high to low, tied scores entering together (no interpolation). Shapes as
    :func:`roc_auc`. A chance-level scorer gets the positive rate, not 0.5."""
    return _area(scores, labels, "auprc")


def _area(scores, labels, metric: str) -> torch.Tensor | float:
    s, y = _scored(scores, labels)
    order, first, last = _ranked(s)
    ys = y.expand_as(s).gather(-1, order)
    area = _area_sorted(ys, torch.ones_like(ys), first, last, metric)
    return area if s.dim() == 2 else float(area)


def _scored(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [n] or [L, n] and 0/1 labels ([n] or the scores' shape) as float64 on the scores' device, checked:
    no NaN score, both classes in every row."""
    s = _f64(scores)
    y = _f64(labels, s.device)
    if s.dim() not in (1, 2) or y.shape not in (s.shape, s.shape[-1:]):
        raise ValueError(f"scores must be [n] or [n_layers, n] and labels [n] (or the scores' shape), got scores "
                         f"{tuple(s.shape)} and labels {tuple(y.shape)}")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 and 1")
    positives = y.sum(-1)
    if torch.any(positives == 0) or torch.any(positives == y.shape[-1]):
        raise ValueError("labels must contain both classes (0 and 1) in every row: the area is undefined otherwise")
    return s, y


def _ranked(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ascending order of each row of s [..., n], and for each sorted position the positions of the first and
    the last member of its group of tied scores [..., n]."""
    order = torch.argsort(s, dim=-1)
    v = s.gather(-1, order)
    n = v.shape[-1]
    index = torch.arange(n, device=s.device).expand_as(v)
    starts = torch.ones_like(v, dtype=torch.bool)
    starts[..., 1:] = v[..., 1:] != v[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, index, 0).cummax(-1).values
    last = torch.where(ends, index, n).flip(-1).cummin(-1).values.flip(-1)
    return order, first, last


def _area_sorted(y: torch.Tensor, w: torch.Tensor, first: torch.Tensor, last: torch.Tensor, metric: str
                 ) -> torch.Tensor:
    """AUROC or AUPRC of rows sorted by ascending score, with tie groups ``first``/``last`` (from :func:`_ranked`)
    and integer row weights w (how many times a row counts, as after a resample; broadcasting with y) [..., n].
    Weights act as copies of the rows, so resamples need no gathering of rows."""
    pos = w * y
    w = w.expand_as(pos)
    neg = w - pos
    first, last = first.expand_as(pos), last.expand_as(pos)

    def before(values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """The sum of values at sorted positions < at."""
        cum = torch.cat([torch.zeros_like(values[..., :1]), values.cumsum(-1)], -1)
        return cum.gather(-1, at)

    if metric == "auroc":  # positives' weight times the negatives below them, ties counting one half
        below = before(neg, first)
        tied = before(neg, last + 1) - below
        return (pos * (below + 0.5 * tied)).sum(-1) / (pos.sum(-1) * neg.sum(-1))
    # auprc: each positive contributes the precision at its own score taken as the threshold (score >= it)
    tp_above = pos.sum(-1, keepdim=True) - before(pos, first)
    all_above = w.sum(-1, keepdim=True) - before(w, first)
    precision = torch.where(pos > 0, tp_above / all_above.clamp(min=1e-300), 0.0)
    return (pos * precision).sum(-1) / pos.sum(-1)


def bootstrap_auc(scores, labels, groups=None, metric: str = "auroc", n_resamples: int = 2000, seed: int = 0,
                  max_block: int = 1 << 22) -> dict | list[dict]:
    """AUROC (:func:`roc_auc`) or AUPRC (:func:`average_precision`) of held-out scores with a 95% percentile
    interval from resampling the held-out *groups* with replacement (seeded, so reruns agree): all rows of a drawn
    group come together, so rows that share a source (the prompts of one question, say) do not count as
    independent. Without ``groups`` each row is its own group.

    scores: [n] or [L, n] (one row per layer; every layer sees the same resamples); labels: [n] 0/1; groups: [n]
    of any hashable labels. A resample that draws only one class has no area: it is skipped and counted in
    ``n_skipped``, and the interval comes from the others. Resamples are scored as row weights (how many times each
    row was drawn), in blocks of at most ``max_block`` values. Returns, for [n] scores, ``{"metric", "value",
    "ci95": [low, high], "n", "n_groups", "n_resamples", "n_skipped", "seed"}``; for [L, n] a list of them.
    """
    if metric not in AREAS:
        raise ValueError(f"metric must be one of {AREAS}, got {metric!r}")
    s, y = _scored(scores, labels)
    if y.dim() != 1:
        raise ValueError(f"labels must be [n] (the same held-out rows for every layer), got {tuple(y.shape)}")
    codes, n_groups = _group_codes(groups, len(y), y.device)
    rows = s if s.dim() == 2 else s[None]
    order, first, last = _ranked(rows)
    value = _area_sorted(y[order], torch.ones_like(rows), first, last, metric)
    draws = _resample_rows(n_groups, n_resamples, seed, y.device)
    counts = torch.zeros(n_resamples, n_groups, dtype=F64, device=y.device).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=F64))
    weights = counts[:, codes]  # [R, n]: how many times each row was drawn
    kept = weights[((weights @ y) > 0) & ((weights @ (1 - y)) > 0)]
    if len(kept) == 0:
        raise ValueError(f"all {n_resamples} resamples drew a single class; more groups of both classes are needed")
    per_block = max(1, max_block // rows.numel())
    areas = torch.cat([_area_sorted(y[order], w[:, order], first, last, metric) for w in kept.split(per_block)])
    entries = [{"metric": metric, "value": float(value[i]), "ci95": list(_percentile_interval(areas[:, i])),
                "n": len(y), "n_groups": n_groups, "n_resamples": n_resamples,
                "n_skipped": n_resamples - len(kept), "seed": seed} for i in range(len(rows))]
    return entries if s.dim() == 2 else entries[0]


def _group_codes(groups, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Group labels [n] (any hashable values; None: one group per row) as codes 0..G-1 on ``device``, and G."""
    if groups is None:
        return torch.arange(n, device=device), n
    values = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    if values.shape != (n,):
        raise ValueError(f"groups must be [n] with n = {n} (as the scores), got shape {values.shape}")
    _, codes = np.unique(values, return_inverse=True)
    return torch.as_tensor(codes.reshape(-1), device=device), int(codes.max()) + 1


# ---------------------------------------------------------------------------------------------------- exact match

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Open-domain-QA normalisation (as in SQuAD/NQ): lowercase, drop punctuation (any Unicode punctuation
    character) and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in str(text).lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised answer."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("exact_match needs at least one answer")
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(a) for a in answers)


def exact_matches(answers: Sequence[str], references: Sequence[Sequence[str]]) -> list[bool]:
    """Whether each answer matches one of its references after QA normalisation."""
    if not answers or len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    return [bool(exact_match(a, r)) for a, r in zip(answers, references, strict=True)]


def exact_match_rate(answers: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of answers matching one of their references after QA normalisation."""
    matches = exact_matches(answers, references)
    return sum(matches) / len(matches)
