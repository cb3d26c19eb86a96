"""The steering panel (steering/panel.py) without a browser: its generate() and its button, on the tiny model."""

import pytest
import torch

import steering.panel as panel_module
from probes.errors import WorkbenchError
from probes.forward import next_token_logprobs
from steering.hooks import add
from steering.panel import SteeringPanel, from_session
from tests.helpers import make_sae

PROMPT = "Tell me about the sea."


@pytest.fixture()
def direction(tiny):
    torch.manual_seed(1)
    return 3 * torch.randn(tiny.d_model)  # not unit length: the panel scales it


def make_panel(model, direction, **kwargs):
    return SteeringPanel(model, {"random": direction}, prompt=PROMPT, max_strength=100, max_new_tokens=6, **kwargs)


def test_strength_zero_is_the_baseline_and_a_large_strength_changes_the_completion(tiny, direction):
    panel = make_panel(tiny, direction, layer=1)
    panel.strength.value = 0
    result = panel.generate()
    assert result.steered == result.baseline
    assert (result.top_k["change"] == 0).all() and len(result.top_k) >= panel.top_k
    panel.strength.value = 60
    result = panel.generate()
    assert result.steered != result.baseline
    assert result.top_k["change"].abs().max() > 0
    assert "steering-steered" in panel.output.value and panel.runs == 2


def test_strength_is_the_length_added_at_the_chosen_layer(tiny, direction):
    panel = make_panel(tiny, direction, layer=2, strength=7.5)
    result = panel.generate()
    with add(tiny, direction / direction.norm(), 2, 7.5):
        reference = next_token_logprobs(tiny, [PROMPT])[0].exp()
    shown = torch.tensor(sorted(result.top_k["p steered"].tolist(), reverse=True)[:panel.top_k])
    assert torch.allclose(shown, reference.topk(panel.top_k).values, rtol=1e-5, atol=0)  # the steered top-k
    panel.layer.value = 0  # another layer, another result
    assert not result.top_k.equals(panel.generate().top_k)


def test_ablate_ignores_strength_layer_and_the_direction_sign_and_length(tiny, direction):
    results = []
    for vector, strength, layer in ((direction, 0.0, 1), (-0.1 * direction, 40.0, 3)):
        panel = make_panel(tiny, vector, layer=layer, strength=strength)
        panel.mode.value = "ablate"
        assert panel.strength.disabled and panel.layer.disabled  # they do not apply
        results.append(panel.generate())
    first, second = results
    assert first.top_k["change"].abs().max() > 0  # ablating moved the next token even at strength 0
    assert first.steered == second.steered and first.top_k.equals(second.top_k)
    assert "ablated" in first.edit


def test_controls_are_disabled_while_generating_and_enabled_after(tiny, direction, monkeypatch):
    panel = make_panel(tiny, direction)
    controls = [panel.button, panel.mode, panel.prompt, panel.direction, panel.strength, panel.layer]
    seen = []

    def spy(*args, **kwargs):
        seen.append(([c.disabled for c in controls], panel.progress.layout.display))
        return real(*args, **kwargs)

    real = panel_module.generate
    monkeypatch.setattr(panel_module, "generate", spy)
    panel.button.click()
    assert seen == [([True] * len(controls), "")] * 2  # baseline, then steered
    assert not any(c.disabled for c in controls) and panel.progress.layout.display == "none"
    assert panel.progress.value == panel.progress.max and panel.error is None and panel.runs == 1


def test_an_error_shows_in_one_line_and_the_button_works_again(tiny, direction, monkeypatch):
    panel = make_panel(tiny, direction)
    panel.prompt.value = "  "
    panel.button.click()
    assert isinstance(panel.error, WorkbenchError) and "prompt is empty" in panel.message.value
    assert not panel.button.disabled and panel.output.value == ""

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nTraceback (most recent call last): ...")

    panel.prompt.value = PROMPT
    monkeypatch.setattr(panel_module, "generate", broken)
    panel.button.click()
    assert "RuntimeError: out of memory" in panel.message.value
    assert "Traceback" not in panel.message.value and "\n" not in panel.message.value
    assert not panel.button.disabled and not panel.strength.disabled and panel.progress.layout.display == "none"
    monkeypatch.undo()
    panel.button.click()
    assert panel.error is None and panel.message.value == "" and panel.runs == 1


def test_wrong_width_and_bad_latents_are_refused_in_one_line(tiny):
    with pytest.raises(WorkbenchError, match=r"width 7: .* d_model=64") as error:
        SteeringPanel(tiny, {"short": torch.ones(7)})
    assert "\n" not in str(error.value)
    with pytest.raises(WorkbenchError, match="d_model=64"):
        SteeringPanel(tiny, {"batch": torch.ones(2, 64)})
    with pytest.raises(WorkbenchError, match=r"'zero' has length 0"):
        SteeringPanel(tiny, {"zero": torch.zeros(64)})
    with pytest.raises(WorkbenchError, match="width 576: .* d_model=64"):
        from_session(tiny, sae=make_sae(576), latents=[0])
    with pytest.raises(WorkbenchError, match=r"latent index 32 is out of range: the SAE has 32 latents"):
        from_session(tiny, sae=make_sae(64), latents=[1, 32])
    with pytest.raises(WorkbenchError, match="without their SAE"):
        from_session(tiny, latents=[1])


def test_from_session_offers_named_directions_and_latent_decoder_rows(tiny, direction):
    sae = make_sae(64, "blocks.2.hook_resid_pre")
    panel = from_session(tiny, random=direction, sae=sae, latents=[3, 5])
    assert list(panel.directions) == ["random", "latent 3 (blocks.2.hook_resid_pre)",
                                      "latent 5 (blocks.2.hook_resid_pre)"]
    assert torch.equal(panel.directions["latent 5 (blocks.2.hook_resid_pre)"], sae.W_dec[5].detach())
    assert panel.strength.value == pytest.approx(float(direction.norm()), rel=1e-6)  # its own length first
    panel.direction.value, panel.prompt.value = "latent 3 (blocks.2.hook_resid_pre)", PROMPT
    assert panel.generate().direction == "latent 3 (blocks.2.hook_resid_pre)"
