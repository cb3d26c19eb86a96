"""The direction lens: logit lens against a float64 reference, the projection heatmap against hidden states, and
a direction of the wrong width refused before any forward pass."""

import pytest
import torch

from probes import direction_lens
from probes.direction_lens import (
    direction_logits,
    direction_projections,
    logit_lens,
    logit_lens_figure,
    projection_heatmap,
)
from probes.errors import WorkbenchError
from probes.models import load_model


@pytest.fixture(scope="module")
def llama():
    """A random Llama whose final norm gain is not all ones, so the lens must apply it."""
    return load_model("random:llama")


def test_logit_lens_equals_a_float64_reference_through_the_final_norm(llama):
    norm, head = llama.hf_model.model.norm, llama.hf_model.lm_head
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
    directions = torch.randn(3, llama.d_model, generator=torch.Generator().manual_seed(0)) * 7
    x = directions.double() / directions.double().pow(2).mean(-1, keepdim=True).sqrt()
    normed = x / (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt() * norm.weight.double()
    reference = normed @ head.weight.double().T
    logits = direction_logits(llama, directions)
    assert logits.shape == (3, head.weight.shape[0])
    assert (logits.double() - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert torch.allclose(direction_logits(llama, directions[1]), logits[1], atol=1e-6)
    lens = logit_lens(llama, directions[1], k=5)
    assert lens.promoted_ids == reference[1].topk(5).indices.tolist()
    assert lens.suppressed_ids == reference[1].topk(5, largest=False).indices.tolist()
    assert [v for _, v in lens.promoted] == sorted((v for _, v in lens.promoted), reverse=True)
    assert len(logit_lens_figure(lens).data[0].x) == 10


def test_projection_heatmap_values_equal_hidden_states_on_the_direction(tiny):
    direction = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    prompts = ["The cat sat on the mat.", "Paris is the capital of"]
    proj = direction_projections(tiny, direction, prompts, progress=False)
    assert proj.layers == list(range(tiny.n_layers + 1))
    ids = tiny.tokenizer(prompts[1], return_tensors="pt").input_ids
    assert proj.values[1].shape == (tiny.n_layers + 1, ids.shape[1]) and len(proj.tokens[1]) == ids.shape[1]
    with torch.no_grad():
        hidden = tiny.hf_model(ids.to(tiny.device), output_hidden_states=True).hidden_states
    layer, token = 2, 3
    manual = hidden[layer][0, token].double().cpu() @ (direction.double() / direction.double().norm())
    assert abs(proj.values[1][layer, token].item() - manual.item()) <= 1e-4 * max(1.0, abs(manual.item()))
    some = direction_projections(tiny, direction, prompts[:1], layers=[1, 3], progress=False)
    assert torch.allclose(some.values[0], proj.values[0][[1, 3]], atol=1e-5)
    fig = projection_heatmap(proj)
    assert len(fig.data) == 2 and fig.data[1].z.shape == tuple(proj.values[1].shape)
    assert list(fig.layout.xaxis2.ticktext) == proj.tokens[1]


def test_a_direction_of_the_wrong_width_is_refused_before_any_forward(tiny, monkeypatch):
    monkeypatch.setattr(direction_lens, "extract", lambda *a, **k: pytest.fail("a forward pass ran"))
    for call in (lambda d: logit_lens(tiny, d), lambda d: direction_projections(tiny, d, ["hi"], progress=False)):
        with pytest.raises(WorkbenchError, match=rf"width {tiny.d_model + 1} .*d_model={tiny.d_model}"):
            call(torch.ones(tiny.d_model + 1))
    with pytest.raises(WorkbenchError, match="zero"):
        logit_lens(tiny, torch.zeros(tiny.d_model))
    with pytest.raises(WorkbenchError, match="one direction"):
        direction_projections(tiny, torch.ones(2, tiny.d_model), ["hi"], progress=False)
