"""Numerical comparisons that do not depend on the size of the values or on how busy the CPU is.

Two kinds of check, each used where it fits:

- exactness: run both sides in float64 and require a relative error near float64 rounding (``FLOAT64_REL``);
  an algebraic identity (weights edited = hooks) then holds to ~1e-12, and any real mistake shows at 1e-3 or more.
- float32 agreement: the same computation done two ways (other batch shape, other code path) in float32 differs by
  rounding accumulated over tens of layers, about 1e-6 to 1e-5 of the largest value; ``FLOAT32_REL`` (1e-4, ~800
  float32 ulps) sits well above that and well below what a wrong position, layer or edit gives (1e-2 or more).

The error is max |actual - expected| divided by max |expected| (per row where a row's scale matters).
"""

from __future__ import annotations

import torch

FLOAT32_REL = 1e-4
FLOAT64_REL = 1e-10


def rel_err(actual: torch.Tensor, expected: torch.Tensor, dim: int | None = None) -> float:
    """max |actual - expected| / max |expected|, over everything or (``dim`` given) the worst slice along ``dim``."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double().to(actual.device)
    if dim is None:
        return float((actual - expected).abs().max() / expected.abs().max())
    return float(((actual - expected).abs().amax(dim) / expected.abs().amax(dim)).max())


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, bound: float = FLOAT32_REL,
                     dim: int | None = None) -> None:
    err = rel_err(actual, expected, dim)
    assert err < bound, f"relative error {err:.3g} over the bound {bound:.1g}"
