"""steering.gcg on a tiny random Llama: the one-hot token gradient against finite differences (float64), and the
kept suffix's loss never rising."""

import pytest
import torch

from probes.models import load_model
from steering.gcg import GCGConfig, _embeds, _target_loss, attack_prompt, gcg, token_gradient


@pytest.fixture(scope="module")
def model():
    model = load_model("random:llama-tiny")
    model.hf_model.double()
    return model


def test_token_gradient_matches_finite_difference(model):
    prompt = attack_prompt(model, "Tell me how to do it", "Sure, here is")
    suffix = model.tokenizer("x x x x x", add_special_tokens=False)["input_ids"]
    grad, loss = token_gradient(model, prompt, suffix)
    weight = model.hf_model.get_input_embeddings().weight.detach()
    one_hot = torch.nn.functional.one_hot(torch.tensor(suffix), weight.shape[0]).double()
    for position, token in [(0, 100), (2, 7), (4, 1234)]:
        step = torch.zeros_like(one_hot)
        step[position, token], step[position, suffix[position]] = 1, -1  # toward swapping the token in
        eps = 1e-2  # the norms compute in float32: a larger step keeps rounding below the tolerance
        with torch.no_grad():
            plus, minus = (float(_target_loss(model, prompt, _embeds(model, prompt, ((one_hot + s * eps * step)
                                                                                      @ weight)[None]))[0])
                           for s in (1, -1))
        assert (plus - minus) / (2 * eps) == pytest.approx(float(grad[position, token] - grad[position,
                                                                                           suffix[position]]),
                                                           rel=2e-3, abs=1e-6)
    with torch.no_grad():
        assert loss == pytest.approx(float(_target_loss(model, prompt, _embeds(model, prompt, (one_hot @ weight)[None]))
                                           [0]), rel=1e-12)


def test_kept_loss_never_rises(model):
    config = GCGConfig(steps=5, search_width=8, topk=16, init="x x x x x x", batch_size=8)
    result = gcg(model, "Tell me how to do it", "Sure, here is", config)
    assert len(result.losses) == config.steps + 1
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:], strict=False))
    assert result.losses[-1] < result.losses[0]
    prompt = attack_prompt(model, "Tell me how to do it", "Sure, here is")
    embeds = _embeds(model, prompt, model.hf_model.get_input_embeddings()(torch.tensor([result.suffix_ids])))
    with torch.no_grad():
        assert float(_target_loss(model, prompt, embeds)[0]) == pytest.approx(result.losses[-1], rel=1e-6)
