import math

import numpy as np
import pytest
import torch

from steering.mutual_info import (
    discretize,
    mutual_information,
    mutual_information_discrete,
    mutual_information_sklearn,
    select_latents,
)


def sparse_latents(device, n=400, n_latents=40, informative=11, seed=0):
    """Zero-inflated latents; one of them fires more, and larger, when the label is 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    acts = torch.relu(torch.randn(n, n_latents, generator=g) - 1.0)
    acts[:, informative] = torch.relu(torch.randn(n, generator=g) + 2.0 * labels - 1.5)
    return acts.to(device), labels.to(device)


def test_discretize_codes_zero_and_quantile_bins(device):
    acts = torch.tensor([[0, 0, 0], [0, 2, -1], [1, 2, 0], [2, 2, 0], [3, 2, 0], [4, 5, 0],
                         [5, 0, 0], [6, 0, 0], [7, 0, 0], [8, 0, 0]], dtype=torch.float32, device=device)
    codes = discretize(acts, n_bins=4)
    assert codes.device == acts.device and codes.dtype == torch.int64
    assert codes[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 8 nonzero values in 4 bins of 2
    tied = codes[1:5, 1]
    assert (tied == tied[0]).all() and tied[0] >= 1  # equal values share a bin
    assert codes[:, 1].tolist().count(0) == 5
    assert codes[1, 2] > 0 and (codes[[0, *range(2, 10)], 2] == 0).all()  # nonzero (even negative) is active


def test_mi_on_device_matches_sklearn_and_ranks_the_informative_latent_first(device):
    acts, labels = sparse_latents(device)
    mi = mutual_information(acts, labels)
    reference = mutual_information_sklearn(acts, labels)
    assert mi.device == acts.device and mi.shape == (acts.shape[1],)
    assert np.abs(mi.cpu().numpy() - reference).max() < 1e-6
    assert select_latents(mi, 0.05)[0].item() == 11
    assert mi[11] > 5 * mi[torch.arange(40, device=device) != 11].max()


def test_mi_known_values(device):
    labels = torch.tensor([0, 1] * 50, device=device)
    codes = torch.stack([labels, torch.zeros_like(labels), 1 - labels], dim=1)
    mi = mutual_information_discrete(codes, labels)
    assert mi.tolist() == pytest.approx([math.log(2), 0.0, math.log(2)], abs=1e-12)


def test_select_latents():
    mi = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.2, 0.05, 0.0, 0.0, 0.0, 0.0])
    assert select_latents(mi, 0.3).tolist() == [1, 3, 4]
    assert select_latents(mi, 0.01).tolist() == [1]  # at least one
    assert len(select_latents(mi, 1.0)) == 10
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="proportion"):
            select_latents(mi, bad)
    with pytest.raises(ValueError, match="non-empty"):
        select_latents(torch.tensor([]), 0.5)


def test_bad_inputs_are_refused():
    acts = torch.rand(6, 3)
    with pytest.raises(ValueError, match="labels for"):
        mutual_information(acts, [0, 1, 0])
    with pytest.raises(ValueError, match="binary"):
        mutual_information(acts, [0, 1, 2, 0, 1, 0])
    with pytest.raises(ValueError, match=r"\[n_prompts, n_latents\]"):
        mutual_information(torch.rand(6), [0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        mutual_information(torch.full((6, 3), float("nan")), [0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="n_bins"):
        discretize(acts, n_bins=0)
