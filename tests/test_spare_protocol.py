"""SpARE as the paper runs it: the selection and edit formulas, confidence-weighted targets, demonstrations drawn per
seed, the summary over seeds, bad settings refused early, and the whole comparison of every method on a tiny
model."""

import json

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from probes.conflict import ConflictExample, conflict_prompts
from probes.forward import answer_token_nll
from steering import spare, spare_methods, spare_protocol
from steering.mutual_info import select_by_share
from tests.helpers import make_sae
from tests.numerics import assert_rel_close
from tests.report_checks import check_comparison, check_report


def identity_sae(d: int) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def test_select_by_share_is_the_papers_cumulative_rule():
    mi = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.05])
    expectation = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0])
    assert select_by_share(mi, 0.07, expectation).tolist() == [0]      # 0.5 alone passes 7% of 1.0
    assert select_by_share(mi, 0.6, expectation).tolist() == [0, 2]    # 0.5 <= 0.6 < 0.5 + 0.3
    assert select_by_share(mi, 0.85, expectation).tolist() == [0, 2, 1]
    no_sign = expectation.clone()
    no_sign[2] = 0.0  # no behaviour prefers it: skipped, the next by MI takes its place
    assert select_by_share(mi, 0.6, no_sign).tolist() == [0, 1]
    assert select_by_share(mi, 1.0, expectation).tolist() == [0, 2, 1, 3, 4]
    with pytest.raises(ValueError, match="share"):
        select_by_share(mi, 0.0, expectation)
    with pytest.raises(ValueError, match="zero mutual information"):
        select_by_share(torch.zeros(3), 0.5, torch.ones(3))


def test_paper_edit_removes_up_to_the_scaled_target_and_adds_the_shortfall():
    d = 8
    latents = spare.BehaviourLatents(0, torch.zeros(d), torch.tensor([1]), torch.tensor([2]),
                                     mean_context=torch.full((d,), 3.0), mean_memory=torch.full((d,), 5.0))
    h = torch.zeros(1, d)
    h[0, 1], h[0, 2] = 1.0, 4.0  # the context latent at 1, the memory latent at 4
    sae = identity_sae(d)
    cases = {("context", 0.5): (0.5 * 3 - 1, -min(0.5 * 5, 4)),   # add 0.5, remove 2.5
             ("context", 2.0): (2 * 3 - 1, -min(2 * 5, 4)),       # add 5, remove all 4
             ("memory", 1.0): (-min(1 * 3, 1), 5 - 4),            # remove 1 from latent 1, add 1 to latent 2
             ("memory", 0.5): (-min(0.5 * 3, 1), max(0.5 * 5 - 4, 0))}
    for (target, alpha), (on_1, on_2) in cases.items():
        delta = spare.spare_edit(sae, latents, target, alpha, rule="paper")(h)
        assert delta[0, 1].item() == pytest.approx(on_1) and delta[0, 2].item() == pytest.approx(on_2)
        assert delta[0, [0, 3, 4, 5, 6, 7]].abs().max() == 0
    assert spare.spare_edit(sae, latents, "context", 0.0, rule="paper")(h)[0, 2] == 0  # min(0, z) removes nothing
    with pytest.raises(ValueError, match="rule"):
        spare.spare_edit(sae, latents, "context", rule="other")


def test_confidence_weighted_targets_and_weights():
    d, n = 4, 6
    acts = torch.zeros(n, d)
    acts[:, 0] = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])  # on when the context is used
    acts[:, 1] = torch.tensor([0.0, 0.0, 0.0, 4.0, 8.0, 2.0])  # on when memory is used
    uses_context = torch.tensor([True, True, True, False, False, False])
    weights = torch.tensor([1.0, 1.0, 2.0, 3.0, 1.0, 0.0])
    latents = spare.behaviour_latents(identity_sae(d), acts, uses_context, 0, mi_share=1.0, weights=weights)
    assert latents.mean_context[0].item() == pytest.approx((1 + 2 + 2 * 3) / 4)
    assert latents.mean_memory[1].item() == pytest.approx((3 * 4 + 8) / 4)
    assert latents.context.tolist() == [0] and latents.memory.tolist() == [1]
    with pytest.raises(ValueError, match="exactly one"):
        spare.behaviour_latents(identity_sae(d), acts, uses_context, 0, proportion=0.5, mi_share=0.5)


def test_answer_nll_and_confidence_weights_against_plain_forward_passes(tiny):
    prompts = ["context: A is in B.\nquestion: where is A?\nanswer:", "question: x?\nanswer:"]
    answers = [" B", " the long answer"]
    ours = answer_token_nll(tiny, prompts, answers)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):  # one unpadded pass each
        p_ids = tiny.tokenizer(p)["input_ids"]
        a_ids = tiny.tokenizer(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = tiny.hf_model(torch.tensor([p_ids + a_ids])).logits[0].double()
        logp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1)
        expected = -logp[torch.arange(len(a_ids)), torch.tensor(a_ids)].mean()
        assert_rel_close(ours[i].double(), expected)
    examples = [ConflictExample("q", "c", ("Aland",), "s", ("Bland",))] * 2
    w = spare_protocol.confidence_weights(tiny, prompts, examples, torch.tensor([True, False]))
    sub = answer_token_nll(tiny, prompts, [" Bland"] * 2)
    org = answer_token_nll(tiny, prompts, [" Aland"] * 2)
    assert_rel_close(w, torch.stack([org[0], sub[1]]) / (sub + org), 1e-6)


def facts(n: int) -> list[ConflictExample]:
    return [ConflictExample(f"Where is place {i}?", f"Place {i} is in Aland.", ("Aland",), f"Place {i} is in Bland.",
                            ("Bland",), kind=f"kind{i % 2}") for i in range(n)]


def test_demonstrations_are_drawn_per_seed_from_training_facts_only():
    train = facts(12)
    demos, rest = spare_protocol.draw_demonstrations(train, 3, seed=0)
    again, _ = spare_protocol.draw_demonstrations(train, 3, seed=0)
    other, _ = spare_protocol.draw_demonstrations(train, 3, seed=1)
    assert demos == again and demos["plain"] != other["plain"]
    assert len(rest) == 9 and {d.question for d in demos["plain"]}.isdisjoint(e.question for e in rest)
    assert all(d.answer == "Aland" and "Aland" in d.context for d in demos["plain"])     # original -> original
    assert all(d.answer == "Bland" and "Bland" in d.context for d in demos["context"])   # substituted -> its own
    assert all(d.answer == "Aland" and "Bland" in d.context for d in demos["memory"])    # substituted -> memory
    prompt = conflict_prompts(train[:1], "sub", demos["memory"])[0]
    assert prompt.count("answer: Aland") == 3 and prompt.endswith("answer:")
    with pytest.raises(ValueError, match="too few"):
        spare_protocol.draw_demonstrations(train[:4], 3, seed=0)


def test_summary_over_seeds_paired_comparison_and_transitions():
    per_seed = [[True, True, False, False], [True, False, False, False]]
    s = spare_protocol.summary(per_seed)
    assert s["mean"] == pytest.approx(0.375) and s["sd"] == pytest.approx((0.125 ** 2 * 2) ** 0.5)
    assert s["n"] == 4 and s["seeds"] == 2 and [r["rate"] for r in s["per_seed"]] == [0.5, 0.25]
    assert spare_protocol.seed_average(per_seed).tolist() == [1.0, 0.5, 0.0, 0.0]
    counts = spare_protocol.transitions(["context", "memory", "neither"], ["memory", "memory", "context"])
    assert counts["context -> memory"] == 1 and counts["memory -> memory"] == 1
    assert counts["neither -> context"] == 1 and sum(counts.values()) == 3
    seeds = [{"matches": {"memory": {"spare": m, "no_edit": [False] * 4}},
              "changes": {"memory": {"spare": counts, "no_edit": counts}}} for m in per_seed]
    out = spare_protocol.aggregate(seeds, ["memory"])
    comparison = out["comparisons"]["steer_to_memory"]["spare_vs_no_edit"]
    check_comparison(comparison)
    assert comparison["difference"] == pytest.approx(0.375)
    assert out["behaviour_changes"]["steer_to_memory"]["spare"]["context -> memory"] == 2


@pytest.mark.parametrize("changes, message", [
    ({"strengths": [0.0, 1.0]}, "strengths must be > 0"),
    ({"cad_alphas": [-1.0]}, "cad_alphas must be >= 0"),
    ({"sea_keep": [1.5]}, r"sea_keep must be in \(0, 1\]"),
    ({"dola_buckets": ["middle"]}, "dola_buckets must be low or high"),
    ({"methods": ["dola"], "directions": ["context"]}, "dola cannot steer toward the context: DoLa sharpens"),
    ({"methods": ["closed_book"], "directions": ["context"]}, "closed_book cannot steer toward the context"),
    ({"demonstrations": "fixed"}, "fixed demonstrations.*--n-seeds 1"),
])
def test_bad_settings_are_refused_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        spare.SpareSettings(**changes)


def test_too_few_examples_are_refused():
    with pytest.raises(ValueError, match="too few to draw 3 demonstrations"):
        spare.SpareSettings().check_examples(6)
    spare.SpareSettings().check_examples(25)
    with pytest.raises(ValueError, match="dola cannot steer toward the context"):
        spare_methods.METHODS["dola"].check_target("context")


def test_every_method_is_registered_in_table_order():
    assert tuple(spare_methods.METHODS) == spare.METHOD_NAMES
    assert set(spare_methods.SAME_INPUT) == {"no_edit", "dola", "taskvec", "sea", "actadd", "spare"}


def test_the_comparison_runs_every_method_and_writes_the_contract(tiny, tmp_path, monkeypatch):
    # a random model answers at random: alternate the training answers' behaviour so that both groups exist
    cycle = iter(range(100_000))
    monkeypatch.setattr(spare_protocol, "group_by_behaviour",
                        lambda preds, exs: [("context", "memory")[next(cycle) % 2] for _ in exs])
    saes = {1: make_sae(tiny.d_model, d_sae=32)}
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # the latent dashboards' cache
    settings = spare.SpareSettings(out=tmp_path / "run", n_seeds=2, max_new_tokens=2, tune_n=2, strengths=[0.5, 1.0],
                                   cad_alphas=[1.0], dola_buckets=["high"], taskvec_layers=[1], sea_keep=[0.9],
                                   dashboard_tokens=2000)
    results = spare_protocol.run(tiny, facts(30), saes, settings, progress=False)
    out = settings.out
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["name"] == "custom" and saved["protocol"]["differs_from_paper"] == {"n_seeds": 2}
    assert results["n"] == {"train": 18, "val": 6, "test": 6, "tuning": 2}
    assert set(saved["exact_match"]["steer_to_context"]) == {"no_edit", "cad", "icl", "taskvec", "sea", "actadd",
                                                             "spare"}
    assert set(saved["exact_match"]["steer_to_memory"]) == set(spare.METHOD_NAMES)
    for target, rows in saved["exact_match"].items():
        for method, entry in rows.items():
            assert entry["seeds"] == 2 and entry["n"] == 6 and 0 <= entry["mean"] <= 1
            assert saved[target][method] == entry["mean"]
        assert set(saved["comparisons"][target]) == {f"spare_vs_{m}" for m in rows if m != "spare"}
        for entry in saved["comparisons"][target].values():
            check_comparison(entry)
        assert all(sum(c.values()) == 12 for c in saved["behaviour_changes"][target].values())
    assert [s["seed"] for s in saved["per_seed"]] == [0, 1]
    assert saved["per_seed"][0]["demonstrations"] != saved["per_seed"][1]["demonstrations"]
    assert saved["per_seed"][0]["tuning"]["spare_to_memory"]["setting"]["strength"] in (0.5, 1.0)
    assert len(saved["per_seed"][0]["tuning"]["actadd_to_context"]["val_exact_match"]) == 2
    probe = saved["conflict_probe"]
    assert set(probe) >= {"residual", "attn_out", "mlp_out"} and probe["n_groups"] == 6
    assert len(probe["residual"]["auroc"]) == tiny.n_layers + 1 and len(probe["mlp_out"]["auprc"]) == tiny.n_layers
    assert saved["layers"] == list(range(tiny.n_layers + 1))
    assert saved["conflict_probe_accuracy"] == probe["residual"]["accuracy"]
    assert saved["methods"]["cad"]["extra_input"] and not saved["methods"]["spare"]["extra_input"]
    assert saved["settings"] == settings.to_dict()
    page = check_report(out)
    assert "Table 1" in page and "n/a: DoLa sharpens" in page and "spare vs cad" in page
    for name in ("steering", "probe_auroc", "behaviour_changes", "comparisons", "latents_layer1"):
        assert (out / f"{name}.html").is_file()
    pages = saved["latent_dashboards"]["1"]  # one dashboard per latent seed 0 selected, linked from the report
    selected = saved["per_seed"][0]["latents"]["1"]
    assert sorted(p["latent"] for p in pages) == sorted(selected["context"] + selected["memory"])
    assert all((out / p["page"]).is_file() and p["page"] in page for p in pages)
