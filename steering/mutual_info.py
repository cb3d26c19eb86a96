"""Mutual information between SAE latent activations and a binary behaviour label, for all latents at once on the
device where the activations live (SpARE, Zhao et al. 2024), with scikit-learn as the reference.

Discretisation. SAE latents are sparse: most activations are exactly zero, the rest spread over a heavy tail.
A k-nearest-neighbour MI estimator (scikit-learn's default for continuous features) is ill-posed on such a
zero-inflated variable (massive ties) and is a loop over latents. Instead each latent is coded as
0 = inactive (exactly zero) and 1..n_bins = equal-frequency bins of its nonzero values (edges at the quantiles of
that latent's own nonzero values, lower edge inclusive, so equal values share a bin). MI is then the plug-in
estimate of the discrete joint distribution of (code, label), in nats; it is computed from counts with one
matrix product per code value, so it costs O(n_prompts * n_latents * (n_bins + 1)) on the device.
"""

from __future__ import annotations

import numpy as np
import torch


def _check(acts: torch.Tensor, labels: torch.Tensor | np.ndarray | list | None = None) -> torch.Tensor | None:
    if acts.ndim != 2 or acts.shape[0] == 0 or acts.shape[1] == 0:
        raise ValueError(f"activations must be [n_prompts, n_latents] with both > 0, got {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or infinite values")
    if labels is None:
        return None
    labels = torch.as_tensor(labels, device=acts.device).reshape(-1)
    if labels.numel() != acts.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {acts.shape[0]} prompts")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return labels.long()


def discretize(acts: torch.Tensor, n_bins: int = 4) -> torch.Tensor:
    """Codes [n_prompts, n_latents] (int64, same device): 0 where a latent is zero, else 1..n_bins by the
    equal-frequency bins of that latent's nonzero values."""
    _check(acts)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    active = acts != 0
    # Sort each column with the zeros pushed to the end, so its first nnz entries are its sorted nonzero values.
    ordered = acts.masked_fill(~active, float("inf")).sort(dim=0).values
    nnz = active.sum(0)  # [n_latents]
    codes = active.long()
    for k in range(1, n_bins):
        index = nnz * k // n_bins  # below nnz; 0 where a latent is never active (then no entry uses its edge)
        edge = ordered.gather(0, index[None])  # [1, n_latents]: the k-th quantile of the nonzero values
        codes += (active & (acts >= edge)).long()
    return codes


def mutual_information_discrete(codes: torch.Tensor, labels: torch.Tensor | np.ndarray | list,
                                n_codes: int | None = None) -> torch.Tensor:
    """MI (nats, float64) between each column of integer ``codes`` [n, n_latents] and binary ``labels`` [n]:
    the plug-in estimate from counts, as scikit-learn's ``mutual_info_score``."""
    labels = _check(codes, labels)
    n_codes = int(codes.max()) + 1 if n_codes is None else n_codes
    n = codes.shape[0]
    onehot = torch.nn.functional.one_hot(labels, 2).to(torch.float32).T  # [2, n]
    # counts[c, y, j]: prompts with code c on latent j and label y (float32 sums of 0/1 are exact below 2^24).
    counts = torch.stack([onehot @ (codes == c).to(torch.float32) for c in range(n_codes)]).double()
    joint = counts / n
    p_code = joint.sum(1, keepdim=True)  # [n_codes, 1, n_latents]
    p_label = (onehot.sum(1) / n).double().reshape(1, 2, 1)
    terms = joint * (joint.log() - p_code.log() - p_label.log())
    return torch.where(joint > 0, terms, 0.0).sum((0, 1)).clamp(min=0.0)


def mutual_information(acts: torch.Tensor, labels: torch.Tensor | np.ndarray | list, n_bins: int = 4
                       ) -> torch.Tensor:
    """MI (nats, float64) [n_latents] between each latent's discretised activation and the binary label,
    computed on ``acts``'s device (see the module docstring for the discretisation)."""
    return mutual_information_discrete(discretize(acts, n_bins), labels, n_codes=n_bins + 1)


def mutual_information_sklearn(acts: torch.Tensor, labels: torch.Tensor | np.ndarray | list, n_bins: int = 4,
                               n_jobs: int | None = None) -> np.ndarray:
    """Reference: scikit-learn's ``mutual_info_classif(discrete_features=True)`` on the same discretised values,
    on the CPU (float64 [n_latents], nats)."""
    from sklearn.feature_selection import mutual_info_classif  # only the reference path needs scikit-learn

    labels = _check(acts, labels)
    codes = discretize(acts, n_bins).cpu().numpy()
    return mutual_info_classif(codes, labels.cpu().numpy(), discrete_features=True, n_jobs=n_jobs)


def select_latents(mi: torch.Tensor | np.ndarray, proportion: float) -> torch.Tensor:
    """Indices of the top ``proportion`` of latents by MI (at least one), highest MI first."""
    mi = torch.as_tensor(mi)
    if mi.ndim != 1 or mi.numel() == 0:
        raise ValueError(f"mi must be a non-empty 1-d tensor, got shape {tuple(mi.shape)}")
    if not 0 < proportion <= 1:
        raise ValueError(f"proportion must be in (0, 1], got {proportion}")
    k = max(1, round(proportion * mi.numel()))
    return mi.topk(k).indices


def select_by_share(mi: torch.Tensor | np.ndarray, share: float, expectation: torch.Tensor | np.ndarray
                    ) -> torch.Tensor:
    """SpARE's selection (Zhao et al. 2025): the number k of latents that, taken in order of MI, first hold more
    than ``share`` of the total MI; then the first k latents in MI order among those with MI > 0 and a non-zero
    ``expectation`` (the difference of the two behaviours' mean activations: its sign says which behaviour a latent
    is for). Highest MI first."""
    mi, expectation = torch.as_tensor(mi).double(), torch.as_tensor(expectation).to(torch.as_tensor(mi).device)
    if mi.ndim != 1 or mi.numel() == 0 or expectation.shape != mi.shape:
        raise ValueError(f"mi and expectation must be non-empty 1-d tensors of one shape, got {tuple(mi.shape)} "
                         f"and {tuple(expectation.shape)}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    order = mi.argsort(descending=True)
    total = mi.sum()
    if total <= 0:
        raise ValueError("every latent has zero mutual information with the behaviour: nothing to select")
    k = int((mi[order].cumsum(0) <= share * total).sum()) + 1
    usable = order[(mi[order] > 0) & (expectation[order] != 0)]
    return usable[:k]
