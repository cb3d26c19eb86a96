"""SpARE: latent selection by behaviour, the edit (zero strength changes nothing), last-token hooks, the pipeline."""

import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from probes.conflict import ConflictExample
from probes.metrics import exact_match_rate
from steering import spare
from tests.helpers import make_sae
from tests.report_checks import check_comparison, check_rate, check_report


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
    latents = spare.behaviour_latents(sae, acts, uses_context, layer=2, proportion=2 / d)
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
    delta = spare.spare_edit(sae, latents, "context", strength=1.0)(h)
    assert delta[0, 2] == pytest.approx(-4.0) and delta[0, 1] == pytest.approx(3.0)
    assert delta[0, [0, 3, 4, 5, 6, 7]].abs().max() == 0
    add_only = spare.spare_edit(sae, latents, "context", strength=1.0, remove=False)(h)
    assert add_only[0, 2] == 0 and add_only[0, 1] == pytest.approx(3.0)
    toward_memory = spare.spare_edit(sae, latents, "memory", strength=0.5)(h)
    assert toward_memory[0, 2] == pytest.approx(0.5)  # already at 4, raised to the expected 5
    with pytest.raises(ValueError):
        spare.spare_edit(sae, latents, "both")


def test_zero_strength_leaves_logits_unchanged_and_edits_touch_only_the_last_token(tiny):
    sae = make_sae(tiny.d_model, d_sae=64)
    acts = torch.randn(40, tiny.d_model)
    latents = spare.behaviour_latents(sae, acts, torch.arange(40) % 2 == 0, layer=1, proportion=0.2)
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


def test_run_writes_the_contract(tiny, tmp_path, monkeypatch):
    examples = [ConflictExample(f"Where is place {i}?", f"Place {i} is in Aland.", ("Aland",),
                                f"Place {i} is in Bland.", ("Bland",), kind=f"kind{i % 2}") for i in range(20)]
    # a random model answers at random: make half the training answers "context" and half "memory"
    cycle = iter(range(10_000))
    monkeypatch.setattr(spare, "group_by_behaviour",
                        lambda preds, exs: [("context", "memory")[next(cycle) % 2] for _ in exs])
    saes = {1: make_sae(tiny.d_model, d_sae=32)}
    spare_grid = spare.edit_grid("spare", (0.0, 1.0), generated=(True,))
    settings = spare.SpareSettings(out=tmp_path, proportion=0.25, max_new_tokens=3, tune_n=3)
    results = spare.run(tiny, examples, saes, settings, spare_grid=spare_grid,
                        actadd_grid=spare.edit_grid("actadd", (1.0,)), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["layers"] == list(range(tiny.n_layers + 1))
    assert len(saved["conflict_probe_accuracy"]) == tiny.n_layers + 1
    assert all(0 <= a <= 1 for a in saved["conflict_probe_accuracy"])
    for target in ("steer_to_context", "steer_to_memory"):
        assert set(saved[target]) == {"no_edit", "actadd", "spare"}
        assert all(0 <= v <= 1 for v in saved[target].values())
    tuned = saved["tuning"]["spare_to_context"]
    assert len(tuned["val_exact_match"]) == len(spare_grid) == 4
    assert spare.EditSetting(**tuned["setting"]) in spare_grid
    assert len(saved["tuning"]["actadd_to_memory"]["val_exact_match"]) == 2  # prompt only / prompt+generated
    assert saved["spare_layers"] == [1] and results["n"] == {"train": 12, "val": 4, "test": 4, "tuning": 3}
    assert saved["sae_hooks"] == {"1": "blocks.1.hook_resid_pre"}
    kinds = saved["known_facts_kinds"]
    assert kinds["all"] == {"kind0": 10, "kind1": 10}
    assert {k: sum(kinds[k].values()) for k in ("train", "val", "test")} == {
        k: results["n"][k] for k in kinds if k != "all"}
    assert (tmp_path / "steering.html").is_file() and (tmp_path / "latents_layer1.html").is_file()
    for target in ("steer_to_context", "steer_to_memory"):
        for method, entry in saved["exact_match"][target].items():
            check_rate(entry)
            assert entry["rate"] == saved[target][method] and entry["n"] == 4
        assert set(saved["comparisons"][target]) == {"spare_vs_no_edit", "spare_vs_actadd", "actadd_vs_no_edit"}
        for entry in saved["comparisons"][target].values():
            check_comparison(entry)
    assert saved["settings"] == settings.to_dict() and saved["settings"]["proportion"] == 0.25
    page = check_report(tmp_path)
    assert "<td>tune_n</td><td class=\"num\">3</td>" in page
    assert "Exact match on held-out conflict prompts" in page and "spare vs actadd" in page
    assert "Relation kinds" in page and "kind0" in page
