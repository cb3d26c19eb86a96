"""Representation-engineering baselines for SpARE (Zhao et al., 2025), as pure functions on activation tensors: each
returns an ``Edit`` (``h [n, d] -> delta [n, d]``) that :func:`steering.spare.edit_last_token` adds to the residual
stream at one hook point. Loading the model, building the prompts and reading the activations (for example with
:func:`steering.spare.residual_at`) is the caller's job.

SEA, linear (Qiu et al., 2024, "Spectral Editing of Activations for Large Language Model Alignment"),
:func:`fit_sea`. From activations of the same n prompts under three conditions, neutral H, positive H+ (the wanted
behaviour) and negative H- (the unwanted one), each [n, d] and each centred by its own mean over the n prompts:

    Omega+ = H^T H+ / n,   Omega- = H^T H- / n             (d x d cross-covariances, float64)
    Omega+ = U+ S+ V+^T,   Omega- = U- S- V-^T             (torch.linalg.svd)
    k+ (k-) = the fewest top singular values holding a share ``keep`` of sum(S+^2) (of sum(S-^2))
    P+ = U+_k U+_k^T       (keep the neutral directions that covary most with the positive condition)
    P- = I - U-_k U-_k^T   (remove those that covary most with the negative condition)
    h' = mu + (P+ + P-) (h - mu) / 2,   mu = the neutral mean

and the edit adds ``strength * (h' - h)``. Centring: the paper writes the covariances of the raw activations; here
each condition is centred by its own mean so that the spectra hold how activations vary across prompts, not the
conditions' offsets (a large mean would otherwise take the first singular direction), and the projections act on
``h - mu`` so that an activation at the neutral mean is left where it is. The two edited versions are averaged into
one activation. The SVDs run in float64 on the activations' device (a d x d SVD on the CPU takes a while for large
d); the fitted bases are kept on the CPU. Not implemented: SEA's
non-linear variant (the same edit after an invertible feature map, e.g. squashed exponential), and the paper's
choice of which layers and tokens to edit (that is up to the caller here).

TaskVec (Hendel et al., 2023, "In-Context Learning Creates Task Vectors"), :func:`task_vector`,
:func:`replace_edit`, :func:`mix_edit`: the task vector theta at layer L is the residual stream at the last prompt
token of in-context prompts that demonstrate the wanted behaviour; at inference it replaces the residual stream at
the last prompt token at layer L of the plain prompt. Difference from the paper: there theta comes from one
demonstration prompt ending in a dummy query (averaged over a few such prompts); here it is the mean over all the
training prompts' last tokens, queries included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Edit = Callable[[torch.Tensor], torch.Tensor]  # the same type as steering.spare.Edit


# ------------------------------------------------------------------------------------------------------------ SEA


@dataclass(frozen=True)
class SpectralEdit:
    """A fitted linear SEA edit: orthonormal bases (float64, CPU) of the kept positive directions ``positive``
    [d, k+] and of the removed negative directions ``negative`` [d, k-], and the neutral mean ``mean`` [d]."""

    positive: torch.Tensor
    negative: torch.Tensor
    mean: torch.Tensor
    keep: float

    @property
    def k_positive(self) -> int:
        return self.positive.shape[1]

    @property
    def k_negative(self) -> int:
        return self.negative.shape[1]

    def projection(self, which: str) -> torch.Tensor:
        """The d x d projection P+ (``"positive"``) or P- (``"negative"``), float64."""
        if which == "positive":
            return self.positive @ self.positive.T
        if which == "negative":
            return torch.eye(self.mean.shape[0], dtype=torch.float64) - self.negative @ self.negative.T
        raise ValueError(f"which must be 'positive' or 'negative', got {which!r}")

    def edit(self, strength: float = 1.0) -> Edit:
        """``h -> strength * (h' - h)`` in ``h``'s dtype and device, h' = mu + (P+ + P-)(h - mu) / 2."""
        if not math.isfinite(float(strength)):
            raise ValueError(f"strength must be a finite number, got {strength}")
        moved: dict[tuple, tuple[torch.Tensor, ...]] = {}

        @torch.no_grad()
        def edit(h: torch.Tensor) -> torch.Tensor:
            if h.shape[-1] != self.mean.shape[0]:
                raise ValueError(f"activations have width {h.shape[-1]}, the edit was fitted on {self.mean.shape[0]}")
            work = torch.float64 if h.dtype == torch.float64 else torch.float32
            key = (h.device, work)
            if key not in moved:
                moved[key] = tuple(t.to(h.device, work) for t in (self.positive, self.negative, self.mean))
            pos, neg, mu = moved[key]
            x = h.to(work) - mu
            # h' - h = ((P+ + P-)/2 - I) x = (U+ U+^T x - U- U-^T x - x) / 2, without forming d x d matrices
            delta = 0.5 * ((x @ pos) @ pos.T - (x @ neg) @ neg.T - x)
            return (strength * delta).to(h.dtype)
        return edit


def _check_conditions(neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, keep: float) -> None:
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    for name, t in (("neutral", neutral), ("positive", positive), ("negative", negative)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} activations must be a 2-D tensor [n, d], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} activations have NaN or infinite entries")
    if not neutral.shape == positive.shape == negative.shape:
        raise ValueError("neutral, positive and negative activations must have the same shape (the same prompts "
                         f"under three conditions), got {tuple(neutral.shape)}, {tuple(positive.shape)}, "
                         f"{tuple(negative.shape)}")
    if neutral.shape[0] < 2:
        raise ValueError(f"need at least 2 prompts to estimate covariances, got {neutral.shape[0]}")


def _centred(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().double()
    return t - t.mean(0)


def spectral_share(singular: torch.Tensor, keep: float) -> int:
    """The fewest leading singular values whose squares hold a share ``keep`` of the total (at least 1)."""
    energy = singular.double() ** 2
    total = energy.sum()
    if not total > 0:
        raise ValueError("the cross-covariance is zero: the conditions do not vary together across prompts")
    share = energy.cumsum(0) / total
    # a small tolerance so that keep=1 stops at the last non-zero singular value despite rounding in the sum
    return min(int((share < keep - 1e-12).sum()) + 1, len(singular))


def _top_left(neutral: torch.Tensor, other: torch.Tensor, keep: float) -> torch.Tensor:
    """The leading left singular vectors [d, k] of the cross-covariance neutral^T other / n holding ``keep``."""
    u, s, _ = torch.linalg.svd(neutral.T @ other / neutral.shape[0])
    return u[:, :spectral_share(s, keep)].cpu().contiguous()


def fit_sea(neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, keep: float = 0.99
            ) -> SpectralEdit:
    """Fit linear SEA (module docstring) on paired activations [n, d] of the same prompts under the neutral,
    positive (wanted) and negative (unwanted) conditions; ``keep`` is the share of squared singular values kept of
    the positive cross-covariance and removed of the negative one."""
    _check_conditions(neutral, positive, negative, keep)
    h = _centred(neutral)
    mean = neutral.detach().double().mean(0).cpu()
    pos, neg = _centred(positive.to(neutral.device)), _centred(negative.to(neutral.device))
    return SpectralEdit(_top_left(h, pos, keep), _top_left(h, neg, keep), mean, float(keep))


# -------------------------------------------------------------------------------------------------------- TaskVec


def task_vector(acts: torch.Tensor) -> torch.Tensor:
    """The task vector: the mean over prompts of ``acts`` [n, d] (residual stream at the last prompt token of
    in-context prompts showing the wanted behaviour), [d] in ``acts``' dtype (averaged in float64)."""
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise ValueError("acts must be a 2-D tensor [n, d]")
    if acts.shape[0] == 0:
        raise ValueError("no activations to average: the task vector needs at least one prompt")
    if not torch.isfinite(acts).all():
        raise ValueError("acts have NaN or infinite entries")
    return acts.detach().double().mean(0).to(acts.dtype)


def mix_edit(vector: torch.Tensor, strength: float = 1.0) -> Edit:
    """``h -> strength * (vector - h)``: move h towards ``vector``; strength 1 replaces h by ``vector``, exactly
    where ``vector - h`` is representable in h's dtype, else to within one rounding of it (an additive edit cannot
    set the stream bit for bit when |h| is much larger than |vector|)."""
    vector = torch.as_tensor(vector).detach()
    if vector.dim() != 1:
        raise ValueError(f"vector must have shape [d], got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ValueError("vector has NaN or infinite entries")
    if not math.isfinite(float(strength)):
        raise ValueError(f"strength must be a finite number, got {strength}")

    @torch.no_grad()
    def edit(h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != vector.shape[0]:
            raise ValueError(f"activations have width {h.shape[-1]}, the vector {vector.shape[0]}")
        if strength == 1:  # in h's dtype: h + delta is v up to the rounding of v - h
            return vector.to(h.device, h.dtype) - h
        return (strength * (vector.to(h.device, torch.float64) - h.double())).to(h.dtype)
    return edit


def replace_edit(vector: torch.Tensor) -> Edit:
    """``h -> vector - h``: adding the delta replaces h by ``vector`` (TaskVec's patch)."""
    return mix_edit(vector, 1.0)
