"""probes.attribution against brute force on tiny random models of four kinds of block: pre-norm (Llama), post-norm
(Gemma-2, OLMo-2), parallel attention + MLP (GPT-J, GPT-NeoX) and mixture of experts (Qwen2-MoE)."""

import pytest
import torch

from probes.attribution import attention_mass, attention_patterns, attn_writer, attribute
from probes.models import load_model

FAMILIES = ["llama", "gemma2", "olmo2", "gptj", "gpt_neox", "qwen2_moe"]
POST_NORM = {"gemma2", "olmo2"}
PARALLEL = {"gptj", "gpt_neox"}
IDS = [5, 17, 3, 99, 42, 8, 61, 23, 7]
LAYER = 1  # a middle block of the three: the HF hidden states after it are the stream, not the final norm's output


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_model(f"random:{request.param}")


def _direction(model) -> torch.Tensor:
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))


def test_terms_sum_to_the_stream(model):
    r = _direction(model)
    att = attribute(model, IDS, r, LAYER, positions=[0, 4, -1])
    with torch.no_grad():
        hidden = model.hf_model(input_ids=torch.tensor([IDS]), output_hidden_states=True).hidden_states[LAYER + 1]
    reference = hidden[0, [0, 4, -1]].double() @ (r.double() / r.double().norm())
    assert att.heads.shape == (LAYER + 1, model.bridge.cfg.n_heads, 3)
    torch.testing.assert_close(att.summed(), reference, rtol=1e-4, atol=1e-4 * float(hidden.abs().max()))
    torch.testing.assert_close(att.summed(), att.total, rtol=1e-5, atol=1e-5 * float(hidden.abs().max()))


def _capture(model, names, hooks=()) -> dict:
    """Hook points ``names`` at the last token, float64, with bridge ``hooks`` applied."""
    seen = {}

    def record(name):
        return lambda tensor, hook: seen.__setitem__(name, tensor.detach()[0, -1].double())
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[*hooks, *((n, record(n)) for n in names)]):
        model.bridge(torch.tensor([IDS]))
    return seen


def _ablated(model, head: int, freeze_mlp: bool) -> dict:
    """The last token's stream after block LAYER and the attention output projection's output with ``head`` zeroed
    (``freeze_mlp``: the same block's MLP output held at its clean value)."""
    clean_mlp = {}

    def zero(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    def keep(t, hook):
        clean_mlp["x"] = t.detach().clone()

    def restore(t, hook):
        return clean_mlp["x"]
    mlp = f"blocks.{LAYER}.hook_mlp_out"
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(mlp, keep)]):
        model.bridge(torch.tensor([IDS]))
    hooks = [(f"blocks.{LAYER}.attn.hook_z", zero)] + ([(mlp, restore)] if freeze_mlp else [])
    return _capture(model, [f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.attn.o.hook_out"], hooks)


def _is(model, families) -> bool:
    name = type(model.hf_model).__name__.lower()
    return any(f.replace("_", "") in name for f in families)


@pytest.mark.parametrize("head", [0, 3])
def test_zero_ablating_a_head(model, head):
    """The head's direct effect, with the same block's MLP held at its clean output (a sequential block's MLP reads
    the head's output; a parallel block's does not, so there it need not be held). Pre-norm, parallel and MoE
    blocks: the projection at the block's output moves by exactly minus the head's attribution. Post-norm blocks:
    by the post-norm of the attention output without the head minus with it (the norm's scale changes)."""
    r = _direction(model).double()
    r = r / r.norm()
    att = attribute(model, IDS, r, LAYER)
    post, o_out = f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.attn.o.hook_out"
    clean = _capture(model, [post, o_out])
    ablated = _ablated(model, head, freeze_mlp=True)
    change = float((ablated[post] - clean[post]) @ r)
    if not _is(model, POST_NORM):
        assert change == pytest.approx(-float(att.heads[LAYER, head, 0]), rel=1e-4, abs=1e-6)
        if _is(model, PARALLEL):
            free = float((_ablated(model, head, freeze_mlp=False)[post] - clean[post]) @ r)
            assert free == pytest.approx(change, rel=1e-4, abs=1e-6)
        return
    norm = attn_writer(model, LAYER).module
    with torch.no_grad():
        expected = (norm(ablated[o_out].float()).double() - norm(clean[o_out].float()).double()) @ r
    assert change == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert change != pytest.approx(-float(att.heads[LAYER, head, 0]), rel=1e-3)  # linearised, not the ablation


def test_attention_patterns(model):
    patterns = attention_patterns(model, IDS, queries=[-1, 2])
    assert patterns.shape == (model.n_layers, model.bridge.cfg.n_heads, 2, len(IDS))
    torch.testing.assert_close(patterns.sum(-1), torch.ones(patterns.shape[:-1]), rtol=0, atol=1e-5)
    assert float(patterns[:, :, 1, 3:].abs().max()) == 0  # causal: query 2 sees keys 0..2 only
    mass = attention_mass(patterns, {"start": (0, 4), "rest": (4, len(IDS))})
    torch.testing.assert_close(mass["start"] + mass["rest"], torch.ones(patterns.shape[:-1]), rtol=0, atol=1e-5)


def test_patterns_match_eager_attention():
    model = load_model("random:llama")
    model.hf_model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model.hf_model(input_ids=torch.tensor([IDS]), output_attentions=True).attentions
    patterns = attention_patterns(model, IDS, queries=[-1])
    torch.testing.assert_close(patterns[:, :, 0], torch.stack([a[0, :, -1] for a in eager]), rtol=1e-4, atol=1e-5)
