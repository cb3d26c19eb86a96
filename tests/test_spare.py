"""SpARE: latent selection by behaviour, the workbench's edit rule (zero strength changes nothing), last-token hooks,
the split."""


import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from probes.conflict import ConflictExample
from probes.metrics import exact_match_rate
from steering import spare
from tests.helpers import make_sae


def test_behaviour_latents_pick_the_informative_latents():
    d, n = 16, 400
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    uses_context = torch.arange(n) % 2 == 0
    acts = torch.rand(n, d) * 0.1
    acts[:, 3] = uses_context.float() * (1 + torch.rand(n))      # on only when the context is used
    acts[:, 7] = (~uses_context).float() * (1 + torch.rand(n))   # on only when memory is used
    latents = spare.behaviour_latents(sae, acts, uses_context, layer=2, proportion=2 / d, mi_share=None)
    assert latents.context.tolist() == [3] and latents.memory.tolist() == [7]
    assert latents.mean_context[3] > 1 and latents.mean_memory[3] == 0
    with pytest.raises(ValueError):
        spare.behaviour_latents(sae, acts, torch.ones(n, dtype=torch.bool), layer=2)


def test_spare_edit_swaps_the_behaviour_latents():
    d = 8
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    latents = spare.BehaviourLatents(0, torch.zeros(d), torch.tensor([1]), torch.tensor([2]),
                                     mean_context=torch.full((d,), 3.0), mean_memory=torch.full((d,), 5.0))
    h = torch.zeros(1, d)
    h[0, 2] = 4.0  # a memory latent is on
    delta = spare.spare_edit(sae, latents, "context", strength=1.0, rule="workbench")(h)
    assert delta[0, 2] == pytest.approx(-4.0) and delta[0, 1] == pytest.approx(3.0)
    assert delta[0, [0, 3, 4, 5, 6, 7]].abs().max() == 0
    add_only = spare.spare_edit(sae, latents, "context", strength=1.0, remove=False, rule="workbench")(h)
    assert add_only[0, 2] == 0 and add_only[0, 1] == pytest.approx(3.0)
    toward_memory = spare.spare_edit(sae, latents, "memory", strength=0.5, rule="workbench")(h)
    assert toward_memory[0, 2] == pytest.approx(0.5)  # already at 4, raised to the expected 5, times 0.5
    with pytest.raises(ValueError):
        spare.spare_edit(sae, latents, "both")


def test_zero_strength_leaves_logits_unchanged_and_edits_touch_only_the_last_token(tiny):
    sae = make_sae(tiny.d_model, d_sae=64)
    acts = torch.randn(40, tiny.d_model)
    latents = spare.behaviour_latents(sae, acts, torch.arange(40) % 2 == 0, layer=1, proportion=0.2, mi_share=None)
    ids = tiny.tokenizer(["the cat sat on the mat", "a b c d e f"], return_tensors="pt").input_ids.to(tiny.device)
    hook = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        clean = tiny.hf_model(ids).logits
        with spare.edit_last_token(tiny, {hook: spare.spare_edit(sae, latents, "context", 0.0)}):
            zero = tiny.hf_model(ids).logits
        with spare.edit_last_token(tiny, {hook: spare.add_edit(torch.ones(tiny.d_model) * 5, 1.0)}):
            pushed = tiny.hf_model(ids).logits
    assert torch.equal(clean, zero)
    assert torch.allclose(clean[:, :-1], pushed[:, :-1])  # causal: earlier positions untouched
    assert (clean[:, -1] - pushed[:, -1]).abs().max() > 1e-3
    assert torch.equal(tiny.hf_model(ids).logits, clean)  # hooks removed on exit
    with spare.edit_last_token(tiny, {hook: spare.add_edit(torch.ones(tiny.d_model) * 5, 1.0)}, generated=False):
        generated = tiny.hf_model.generate(ids, max_new_tokens=3, do_sample=False)
    with spare.edit_last_token(tiny, {hook: spare.add_edit(torch.ones(tiny.d_model) * 5, 1.0)}, generated=False):
        one_token_step = tiny.hf_model(ids[:, :1]).logits
        assert torch.allclose(tiny.hf_model(ids).logits, pushed)  # the prompt pass is still edited
    assert torch.equal(one_token_step, tiny.hf_model(ids[:, :1]).logits)  # one-token passes are generation steps
    assert generated.shape == (2, ids.shape[1] + 3)
    with pytest.raises(ValueError):
        with spare.edit_last_token(tiny, {"blocks.99.hook_resid_pre": spare.add_edit(torch.ones(tiny.d_model), 1.0)}):
            pass


def test_split_and_exact_match_rate():
    examples = [ConflictExample(f"q{i}", "c", ("a",), "s", ("b",)) for i in range(10)]
    parts = spare.split(examples, seed=1)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(e.question for p in parts.values() for e in p) == sorted(e.question for e in examples)
    assert spare.split(examples, seed=1)["test"] == parts["test"]
    assert exact_match_rate(["The B.", "c"], [("b",), ("a",)]) == 0.5
    with pytest.raises(ValueError):
        spare.split(examples[:2])
