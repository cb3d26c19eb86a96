"""Representation-engineering baselines: linear SEA against a numpy reimplementation and on a constructed case, and
the TaskVec patch replacing the residual stream at the last prompt token of the tiny model."""

import numpy as np
import pytest
import torch

from probes.architecture import on_residual
from probes.cache import extract
from steering.representation_baselines import (
    fit_sea,
    mix_edit,
    replace_edit,
    spectral_share,
    task_vector,
)
from steering.spare import edit_last_token


def numpy_sea(neutral, positive, negative, keep, h):
    """Linear SEA written out plainly in float64 numpy: the edited activations h' for rows h, and k+, k-."""
    neutral, positive, negative, h = (np.asarray(t, dtype=np.float64) for t in (neutral, positive, negative, h))
    n, d = neutral.shape
    centred = [t - t.mean(axis=0) for t in (neutral, positive, negative)]

    def top(other):
        u, s, _ = np.linalg.svd(centred[0].T @ other / n)
        share = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.argmax(share >= keep)) + 1
        return u[:, :k], k

    u_pos, k_pos = top(centred[1])
    u_neg, k_neg = top(centred[2])
    p_pos = u_pos @ u_pos.T
    p_neg = np.eye(d) - u_neg @ u_neg.T
    mu = neutral.mean(axis=0)
    return mu + (h - mu) @ (0.5 * (p_pos + p_neg)).T, k_pos, k_neg


def test_sea_matches_a_numpy_reimplementation():
    g = torch.Generator().manual_seed(0)
    n, d = 60, 12
    mixing = torch.randn(d, d, generator=g) * torch.linspace(3, 0.1, d)  # an uneven spectrum
    neutral = torch.randn(n, d, generator=g) @ mixing + 2.0
    positive = neutral @ torch.randn(d, d, generator=g) * 0.5 + torch.randn(n, d, generator=g)
    negative = neutral + torch.randn(n, d, generator=g) * 0.3 - 1.0
    h = torch.randn(7, d, generator=g) * 3
    for keep in (0.5, 0.9, 0.99):
        sea = fit_sea(neutral, positive, negative, keep=keep)
        expected, k_pos, k_neg = numpy_sea(neutral.numpy(), positive.numpy(), negative.numpy(), keep,
                                           h.double().numpy())
        assert (sea.k_positive, sea.k_negative) == (k_pos, k_neg)
        assert 0 < sea.k_positive < d and 0 < sea.k_negative < d  # a real truncation, not the trivial case
        delta = sea.edit()(h.double())
        np.testing.assert_allclose((h.double() + delta).numpy(), expected, atol=1e-10)
        dense = sea.mean + (h.double() - sea.mean) @ (0.5 * (sea.projection("positive")
                                                            + sea.projection("negative"))).T
        np.testing.assert_allclose(dense.numpy(), expected, atol=1e-10)
        low = sea.edit(0.5)(h)  # float32 in, float32 out, half the step
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), 0.5 * delta, atol=1e-4, rtol=1e-4)


def test_sea_removes_the_negative_direction_and_keeps_the_positive_one():
    g = torch.Generator().manual_seed(1)
    n, d = 300, 16
    u, v = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T  # orthonormal, otherwise random
    factors = torch.randn(n, 2, generator=g)
    # two prompt-level factors with zero mean, unit variance and exactly no sample correlation
    s, t = (torch.linalg.qr(factors - factors.mean(0))[0] * n ** 0.5).T.unsqueeze(-1)

    def noise():
        return 1e-3 * torch.randn(n, d, generator=g)
    neutral = 5.0 + s * u + t * v + noise()
    negative = s * u + noise()    # the unwanted condition follows the neutral along u only
    positive = -3.0 + t * v + noise()  # the wanted one along v only
    sea = fit_sea(neutral, positive, negative)
    assert (sea.k_positive, sea.k_negative) == (1, 1)
    for h in (neutral[:20], sea.mean.float() + 3 * torch.randn(20, d, generator=g)):  # fitted rows, and others
        before = h - sea.mean.float()
        after = before + sea.edit()(h)
        assert (before @ u).abs().mean() > 0.5
        torch.testing.assert_close(after @ u, torch.zeros(20), atol=2e-3, rtol=0)
        torch.testing.assert_close(after @ v, before @ v, atol=2e-3, rtol=0)

        def rest(x):  # directions in neither subspace: kept by P-, dropped by P+, so halved
            return x - torch.outer(x @ u, u) - torch.outer(x @ v, v)
        torch.testing.assert_close(rest(after), 0.5 * rest(before), atol=2e-3, rtol=0)
    at_mean = sea.edit()(sea.mean.float().unsqueeze(0))
    torch.testing.assert_close(at_mean, torch.zeros(1, d), atol=1e-5, rtol=0)


def test_sea_zero_strength_and_bad_inputs():
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(10, 6, generator=g) for _ in range(3))
    sea = fit_sea(a, b, c, keep=1.0)
    h = torch.randn(4, 6, generator=g, dtype=torch.float64)
    zero = sea.edit(0.0)(h)
    assert zero.dtype == torch.float64 and torch.equal(zero, torch.zeros_like(h))
    assert 1 <= sea.k_positive <= 6 and 1 <= sea.k_negative <= 6
    with pytest.raises(ValueError, match="same shape"):
        fit_sea(a, b[:9], c)
    with pytest.raises(ValueError, match="same shape"):
        fit_sea(a, b[:, :5], c)
    with pytest.raises(ValueError, match="at least 2"):
        fit_sea(a[:1], b[:1], c[:1])
    with pytest.raises(ValueError, match="2-D"):
        fit_sea(a[0], b[0], c[0])
    for keep in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            fit_sea(a, b, c, keep=keep)
    with pytest.raises(ValueError, match="NaN"):
        fit_sea(a, b, c.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="zero"):
        fit_sea(a, torch.ones_like(b), c)  # a constant condition does not covary with anything
    with pytest.raises(ValueError, match="width"):
        sea.edit()(torch.zeros(2, 5))
    assert spectral_share(torch.tensor([3.0, 1.0, 0.0]), 1.0) == 2
    assert spectral_share(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1


def test_task_vector_and_mix_edit():
    acts = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(task_vector(acts), torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="at least one"):
        task_vector(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="2-D"):
        task_vector(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        task_vector(torch.tensor([[float("nan"), 1.0]]))
    h = torch.tensor([[0.0, 0.0], [4.0, 8.0]])
    v = torch.tensor([2.0, 4.0])
    assert torch.equal(mix_edit(v, 0.5)(h), torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    assert torch.equal(mix_edit(v, 0.0)(h), torch.zeros_like(h))
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = (torch.randn(64, 32, generator=g) * 10).to(dtype)
        v = torch.randn(32, generator=g)
        replaced = h + replace_edit(v)(h)
        assert replaced.dtype == dtype
        # to within one rounding of v - h (|v - h| < 64 here)
        torch.testing.assert_close(replaced, v.to(dtype).expand_as(h), atol=64 * torch.finfo(dtype).eps, rtol=0)
    h = torch.tensor([[1.5, -2.0, 0.25]])
    assert torch.equal(h + replace_edit(torch.tensor([0.75, 3.0, -1.0]))(h), torch.tensor([[0.75, 3.0, -1.0]]))
    with pytest.raises(ValueError, match="shape"):
        replace_edit(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="width"):
        replace_edit(torch.zeros(3))(torch.zeros(1, 4))


def test_replace_edit_sets_the_last_prompt_token_of_the_tiny_model(tiny):
    hook, block = "blocks.1.hook_resid_pre", tiny.architecture.blocks[1]
    ids = tiny.tokenizer(["the cat sat on the mat", "a b c d e f"], return_tensors="pt").input_ids.to(tiny.device)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4)).to(tiny.device) * 3
    seen = []

    def read(hidden):
        seen.append(hidden.detach().clone())
    with torch.no_grad():
        handle = on_residual(block, "pre", read)
        clean_logits = tiny.hf_model(ids).logits
        handle.remove()
        with edit_last_token(tiny, {hook: replace_edit(v)}, generated=False):
            handle = on_residual(block, "pre", read)  # registered after the edit: reads the edited stream
            logits = tiny.hf_model(ids).logits
            handle.remove()
            via_extract = extract(tiny, ["the cat sat on the mat"], hooks=[hook], padding_side="left",
                                  progress=False, dtype=tiny.dtype)[hook]  # [1, d]
    clean, edited = seen
    # v - h is rounded once in the hidden dtype, so v is reached to within a rounding of |v - h|
    tol = 2 * torch.finfo(edited.dtype).eps * float((v - clean[:, -1]).abs().max())
    torch.testing.assert_close(edited[:, -1], v.to(edited.dtype).expand(len(ids), -1), atol=tol, rtol=0)
    assert torch.equal(edited[:, :-1], clean[:, :-1])
    assert not torch.equal(clean[:, -1], edited[:, -1])
    assert torch.equal(logits[:, :-1], clean_logits[:, :-1])
    assert not torch.allclose(logits[:, -1], clean_logits[:, -1])
    torch.testing.assert_close(via_extract[0], v.to(via_extract.dtype), atol=tol, rtol=0)
