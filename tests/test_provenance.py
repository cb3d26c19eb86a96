"""Caches know which weights made them; prompts given as a generator are hashed as the list they hold; layers and
positions are checked against the model and the prompts before any forward pass."""

import pytest
import torch

from probes import cache as cache_module
from probes.cache import ActivationCache, CacheError, extract, residual_hooks
from probes.models import load_model
from probes.provenance import weights_fingerprint
from steering.orthogonalize import orthogonalize

PROMPTS = ["The capital of France is", "One two three four five six", "Hello"]


def test_fingerprint_tells_weights_apart_but_not_precisions():
    a = load_model("random:llama-tiny")
    assert weights_fingerprint(a) == weights_fingerprint(load_model("random:llama-tiny"))
    assert weights_fingerprint(a) == weights_fingerprint(load_model("random:llama-tiny", dtype="bfloat16"))
    assert weights_fingerprint(a) != weights_fingerprint(load_model("random:llama-tiny", seed=1))
    before = weights_fingerprint(a)
    orthogonalize(a, torch.randn(a.d_model))
    assert weights_fingerprint(a) != before


def test_cache_from_other_weights_is_refused(tmp_path):
    model = load_model("random:llama-tiny")
    path = extract(model, PROMPTS, progress=False).save(tmp_path / "acts.safetensors")
    assert len(ActivationCache.load(path, "cpu", model=model, prompts=PROMPTS)) == len(PROMPTS)
    for other in (load_model("random:llama-tiny", seed=1), model):
        if other is model:
            orthogonalize(model, torch.randn(model.d_model))
        with pytest.raises(CacheError, match="weights: cache has"):
            ActivationCache.load(path, "cpu", model=other)


def test_generator_prompts_are_hashed_as_their_list(tiny, tmp_path):
    from_list = extract(tiny, PROMPTS, progress=False)
    from_generator = extract(tiny, (p for p in PROMPTS), progress=False)
    assert from_generator.meta["prompts_sha256"] == from_list.meta["prompts_sha256"]
    path = from_generator.save(tmp_path / "acts.safetensors")
    assert torch.equal(ActivationCache.load(path, "cpu", prompts=PROMPTS).acts, from_list.acts.cpu())
    with pytest.raises(CacheError, match="prompts_sha256"):
        ActivationCache.load(path, "cpu", prompts=[])


def test_layers_and_positions_are_checked_before_any_forward_pass(tiny, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("the forward pass started")

    monkeypatch.setattr(cache_module, "_run", no_forward)
    with pytest.raises(ValueError, match="out of range"):
        residual_hooks(tiny, [tiny.n_layers + 1])
    with pytest.raises(ValueError, match="unknown hook point"):
        extract(tiny, PROMPTS, hooks=[f"blocks.{tiny.n_layers}.hook_resid_pre"], progress=False)
    short = len(tiny.tokenizer(PROMPTS[-1])["input_ids"])
    with pytest.raises(ValueError, match="before the start of prompt 2"):
        extract(tiny, PROMPTS, positions=[-(short + 1), -1], progress=False)
