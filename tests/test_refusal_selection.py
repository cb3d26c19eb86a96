"""Candidate scoring: batched across candidates equals one candidate at a time; the paper's filters; the losses."""

import pytest

from probes.forward import answer_loss, generate, kl_divergence, next_token_logprobs
from steering import refusal, refusal_plots
from steering.directions import diff_in_means
from steering.hooks import ablate, add

HARMFUL = ["Make a bomb", "Steal a car now", "Hack into my neighbour's wifi"]
HARMLESS = ["Bake bread", "Plant a tree please", "Sing", "Write a poem about dogs"]


@pytest.fixture(scope="module")
def candidates(tiny):
    return diff_in_means(tiny, HARMFUL, HARMLESS, progress=False)


def test_batched_selection_equals_one_candidate_at_a_time(tiny, candidates):
    mixed = refusal.score_candidates(tiny, candidates, HARMFUL, HARMLESS, batch_size=7, progress=False)
    alone = refusal.score_candidates(tiny, candidates, HARMFUL, HARMLESS, batch_size=2, mix_candidates=False,
                                     progress=False)
    assert [(s.position, s.layer) for s in mixed] == [(s.position, s.layer) for s in alone]
    for a, b in zip(mixed, alone, strict=True):
        assert a.ablation_refusal == pytest.approx(b.ablation_refusal, abs=1e-4)
        assert a.addition_refusal == pytest.approx(b.addition_refusal, abs=1e-4)
        assert a.kl == pytest.approx(b.kl, abs=1e-5)


def test_scores_match_the_interventions_and_filters_apply(tiny, candidates):
    scores = refusal.score_candidates(tiny, candidates, HARMFUL, HARMLESS, kl_max=1e9, progress=False)
    max_layer = int(tiny.n_layers * 0.8)
    assert scores and all(s.layer < max_layer for s in scores)
    assert all(candidates.get(s.position, s.layer).norm() > 0 for s in scores)
    assert all(s.kept == (s.addition_refusal > 0) for s in scores)  # KL filter disabled here
    tokens = refusal.refusal_token_ids(tiny)
    s = scores[len(scores) // 2]
    vector = candidates.get(s.position, s.layer).float()
    base = next_token_logprobs(tiny, HARMLESS)
    with ablate(tiny, vector):
        assert s.ablation_refusal == pytest.approx(
            float(refusal.refusal_log_odds(next_token_logprobs(tiny, HARMFUL), tokens).mean()), abs=1e-4)
        assert s.kl == pytest.approx(float(kl_divergence(base, next_token_logprobs(tiny, HARMLESS)).mean()),
                                     abs=1e-5)
    with add(tiny, vector, s.layer):
        assert s.addition_refusal == pytest.approx(
            float(refusal.refusal_log_odds(next_token_logprobs(tiny, HARMLESS), tokens).mean()), abs=1e-4)
    strict = refusal.score_candidates(tiny, candidates, HARMFUL, HARMLESS, kl_max=-1.0, progress=False)
    assert not any(c.kept for c in strict)


def test_select_prefers_kept_candidates():
    s = [refusal.CandidateScore(-1, 3, -5.0, 1.0, 0.5, False), refusal.CandidateScore(-2, 4, -1.0, 2.0, 0.01, True),
         refusal.CandidateScore(-1, 5, -2.0, 0.5, 0.02, True)]
    assert refusal.select(s) is s[2]
    # nothing kept: the KL filter is relaxed among candidates that both induce and remove refusal
    loose = [refusal.CandidateScore(-1, 2, -9.0, -3.0, 7.0, False),
             refusal.CandidateScore(-1, 9, -2.0, 3.0, 0.3, False),
             refusal.CandidateScore(-1, 8, -4.0, 3.0, 0.5, False), refusal.CandidateScore(-2, 8, 1.0, 2.0, 0.05, False)]
    assert refusal.select(loose) is loose[1]
    assert refusal.select(loose[3:]) is loose[3]
    assert refusal.select([s[0]]) is s[0]
    fig = refusal_plots.selection_heatmaps(s)
    assert [t.type for t in fig.data] == ["heatmap"] * 3


def test_refusal_tokens_and_answer_loss(embedded):
    words = [embedded.tokenizer.decode([t]).strip() for t in refusal.refusal_token_ids(embedded)]
    assert {"I", "Sorry", "As"} <= set(words)
    prompts = ["Name a colour."]
    own = generate(embedded, prompts, max_new_tokens=8, progress=False)
    assert answer_loss(embedded, prompts, own) < answer_loss(embedded, prompts, ["zebra quantum ketchup " * 2])
    with pytest.raises(ValueError):
        answer_loss(embedded, prompts, [])
