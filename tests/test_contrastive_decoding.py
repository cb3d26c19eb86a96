"""Contrastive decoding (steering.contrastive_decoding): CAD against plain forward passes and a slow loop without
cache, DoLa's scores on a case worked out by hand and its first token against one plain forward pass, padding
invariance, first-line stopping, bad input."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from probes.architecture import UnsupportedArchitecture, final_norm_and_unembedding
from probes.forward import generate_from_ids, text_token_ids
from probes.models import load_model
from steering.contrastive_decoding import (
    answer_complete,
    candidate_layer_buckets,
    contrastive_generate,
    dola_divergence,
    dola_generate,
    dola_scores,
    stop_ids,
)

QUESTIONS = ["Question: Where is Oslo?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer:",
             "Question: What is the largest planet of the solar system, by mass?\nAnswer:"]
CONTEXTS = ["Oslo is located in Chile.", "Hamlet was written by Jane Austen in a cold winter long ago.", "No."]
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def gpt2(device):
    """A tiny GPT-2: learned absolute positions, so left padding shows unless position ids skip it."""
    return load_model("random:gpt2", device=device)


def _ids(model):
    """(prompts with context, the same questions without it): lengths on both sides of a multiple of 8."""
    with_context = text_token_ids(model, [f"Context: {c}\n{q}" for c, q in zip(CONTEXTS, QUESTIONS, strict=True)])
    return with_context, text_token_ids(model, QUESTIONS)


def _last_logits(model, ids) -> torch.Tensor:
    """Next-token logits of one unpadded prompt, from a plain forward pass."""
    return model.hf_model(torch.tensor([ids], device=model.device)).logits[0, -1].float()


# ---------------------------------------------------------------------------------------------------- CAD


def test_cad_with_alpha_zero_is_plain_greedy_decoding(tiny):
    with_context, _ = _ids(tiny)
    plain = generate_from_ids(tiny, with_context, max_new_tokens=8, first_line=True, **QUIET)
    for batch_size in (1, 3):  # the contrast rows differ, alpha 0 ignores them
        assert contrastive_generate(tiny, with_context, list(reversed(with_context)), 0.0, max_new_tokens=8,
                                    batch_size=batch_size, **QUIET) == plain


@torch.inference_mode()
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_cad_first_token_is_the_argmax_of_two_plain_forward_passes(tiny, alpha):
    with_context, without = _ids(tiny)
    firsts = contrastive_generate(tiny, with_context, without, alpha, max_new_tokens=1, first_line=False, **QUIET)
    changed = 0
    for a, b, first in zip(with_context, without, firsts, strict=True):
        token = int(((1 + alpha) * _last_logits(tiny, a) - alpha * _last_logits(tiny, b)).argmax())
        assert first == tiny.tokenizer.decode([token], skip_special_tokens=True)
        changed += token != int(_last_logits(tiny, a).argmax())
    assert changed  # the contrast changes some first token


@torch.inference_mode()
def _slow_cad(model, a, b, alpha: float, max_new_tokens: int) -> str:
    """CAD recomputing both conditionings from scratch at every step, one prompt at a time, no cache."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(((1 + alpha) * _last_logits(model, a + new) - alpha * _last_logits(model, b + new)).argmax())
        new.append(token)
        if token in stop_ids(model):
            break
    return model.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("alpha,toward_memory", [(1.0, False), (0.5, True)])
def test_cad_equals_a_slow_loop_without_cache(tiny, alpha, toward_memory):
    with_context, without = _ids(tiny)
    first, second = (without, with_context) if toward_memory else (with_context, without)
    fast = contrastive_generate(tiny, first, second, alpha, max_new_tokens=6, batch_size=3, first_line=False, **QUIET)
    assert fast == [_slow_cad(tiny, a, b, alpha, 6) for a, b in zip(first, second, strict=True)]
    assert len(set(fast)) > 1


def test_first_line_ends_after_the_answer_not_at_a_leading_newline(tiny):
    """The model is made to say "\\n", " Paris", "\\n": the answer is "Paris", as generate_from_ids's first line
    has it, and decoding stops at the second newline, not at the first nor after max_new_tokens."""
    (newline,) = tiny.tokenizer("\n", add_special_tokens=False)["input_ids"]
    (paris,) = tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    calls: list[int] = []

    def say(module, args, output):
        calls.append(1)
        output = output.clone()
        output[..., {1: newline, 2: paris}.get(len(calls), newline)] += 1e4
        return output

    with_context, without = _ids(tiny)
    handle = tiny.hf_model.get_output_embeddings().register_forward_hook(say)
    try:
        ours = contrastive_generate(tiny, with_context, without, 0.0, max_new_tokens=8, batch_size=3, **QUIET)
        steps = len(calls)
        calls.clear()
        plain = generate_from_ids(tiny, with_context, max_new_tokens=8, batch_size=3, first_line=True, **QUIET)
    finally:
        handle.remove()
    assert ours == plain == ["Paris"] * 3
    assert steps == 3
    assert not answer_complete("\n \n", True) and answer_complete("\nParis\n", True)
    assert not answer_complete("Paris\n", False)


def test_cad_refuses_bad_input(tiny):
    with_context, without = _ids(tiny)
    with pytest.raises(ValueError, match="alpha"):
        contrastive_generate(tiny, with_context, without, -0.1, **QUIET)
    with pytest.raises(ValueError, match="one contrast prompt per prompt"):
        contrastive_generate(tiny, with_context, without[:2], 1.0, **QUIET)
    with pytest.raises(ValueError, match="no prompts"):
        contrastive_generate(tiny, [], [], 1.0, **QUIET)


# ---------------------------------------------------------------------------------------------------- DoLa


def test_dola_scores_on_a_case_worked_out_by_hand():
    """V = 4, final p = [0.5, 0.3, 0.16, 0.04]; candidates A = [0.4, 0.2, 0.2, 0.2], B = [0.4, 0.4, 0.1999, 0.0001].

    A: m = [0.45, 0.25, 0.18, 0.12]
       KL(m||p) = 0.45 ln(0.45/0.5) + 0.25 ln(0.25/0.3) + 0.18 ln(0.18/0.16) + 0.12 ln(0.12/0.04)
                = -0.04741 - 0.04558 + 0.02120 + 0.13183 = 0.06004
       KL(m||A) = 0.45 ln(0.45/0.4) + 0.25 ln(0.25/0.2) + 0.18 ln(0.18/0.2) + 0.12 ln(0.12/0.2)
                = 0.05300 + 0.05579 - 0.01896 - 0.06130 = 0.02852;    divergence (0.06004 + 0.02852) / 2 = 0.04428
    B: m = [0.45, 0.35, 0.17995, 0.02005]
       KL(m||p) = -0.04741 + 0.05395 + 0.02115 - 0.01385 = 0.01384
       KL(m||B) = 0.05300 - 0.04674 - 0.01892 + 0.10628 = 0.09363;    divergence (0.01384 + 0.09363) / 2 = 0.05373
    So B is chosen (the textbook JSD, (KL(p||m) + KL(q||m)) / 2, would pick A: 0.03804 for A, 0.02102 for B).
    Plausibility: max p = 0.5, so tokens with p < 0.05 are cut: token 3 (0.04), whose contrast ln(0.04/0.0001) =
    5.9915 would have won. Scores ln(p/B): [ln 1.25, ln 0.75, ln(0.16/0.1999), -inf] = [0.2231, -0.2877, -0.2226,
    -inf]: token 0. Row 2 lists the candidates the other way round, so its chosen index is 0."""
    p = torch.tensor([0.5, 0.3, 0.16, 0.04])
    a, b = torch.tensor([0.4, 0.2, 0.2, 0.2]), torch.tensor([0.4, 0.4, 0.1999, 0.0001])
    final = p.log().expand(2, 4)  # logits: log-probabilities up to a constant
    premature = torch.stack([torch.stack([a, b]), torch.stack([b, a])]).log() + 3.0
    assert torch.allclose(dola_divergence(final, premature), torch.tensor([[0.04428, 0.05373], [0.05373, 0.04428]]),
                          atol=1e-5)
    scores, chosen = dola_scores(final, premature, relative_top=0.1)
    assert chosen.tolist() == [1, 0]
    expected = torch.tensor([0.2231, -0.2877, -0.2226, -math.inf])
    for row in scores:
        assert torch.allclose(row, expected, atol=1e-4) and row.argmax() == 0
    _, loose = dola_scores(final, premature, relative_top=0.05)  # 0.04 >= 0.025: token 3 kept, and it wins
    assert dola_scores(final, premature, relative_top=0.05)[0][0].argmax() == 3 and loose.tolist() == [1, 0]


@torch.inference_mode()
def _reference_dola_token(model, ids, layers, relative_top: float, final_norm: bool) -> int:
    """The next DoLa token of one unpadded prompt from one plain forward pass, as the reference computes it (F.kl_div
    against the mean distribution), with the norm and lm_head modules called directly."""
    hf = model.hf_model
    out = hf(torch.tensor([ids], device=model.device), output_hidden_states=True)
    final = out.logits[0, -1].float().log_softmax(-1)
    early = [hf.lm_head(hf.model.norm(out.hidden_states[layer][0, -1]) if final_norm
                        else out.hidden_states[layer][0, -1]).float().log_softmax(-1) for layer in layers]
    divergences = []
    for e in early:
        m = 0.5 * (final.exp() + e.exp())
        divergences.append(0.5 * (F.kl_div(final, m, reduction="sum") + F.kl_div(e, m, reduction="sum")))
    base = early[int(torch.stack(divergences).argmax())]
    plausible = final >= final.max() + math.log(relative_top)
    return int(torch.where(plausible, final - base, -math.inf).argmax())


@pytest.mark.parametrize("final_norm", [False, True])
def test_dola_first_token_equals_one_plain_forward_pass(tiny, final_norm):
    with_context, without = _ids(tiny)
    prompts, layers = with_context + without, [0, 1, 2, 3]
    firsts = dola_generate(tiny, prompts, layers, max_new_tokens=1, first_line=False, final_norm=final_norm,
                           relative_top=0.2, **QUIET)
    tokens = [_reference_dola_token(tiny, ids, layers, 0.2, final_norm) for ids in prompts]
    assert firsts == [tiny.tokenizer.decode([t], skip_special_tokens=True) for t in tokens]


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_answers_do_not_depend_on_padding_or_batch(request, name):
    model = request.getfixturevalue(name)
    with_context, without = _ids(model)
    prompts = with_context + without
    kwargs = dict(max_new_tokens=6, first_line=False, **QUIET)
    batched = dola_generate(model, prompts, [0, 1, 2], batch_size=6, **kwargs)
    assert batched == [dola_generate(model, [p], [0, 1, 2], **kwargs)[0] for p in prompts]
    assert len(set(batched)) > 1
    cad = contrastive_generate(model, with_context, without, 1.0, batch_size=3, **kwargs)
    assert cad == [contrastive_generate(model, [a], [b], 1.0, **kwargs)[0]
                   for a, b in zip(with_context, without, strict=True)]
    assert len(set(cad)) > 1


def test_candidate_layer_buckets_follow_transformers_dola_layers():
    assert candidate_layer_buckets(32) == {"low": list(range(0, 16, 2)), "high": list(range(16, 32, 2))}
    assert candidate_layer_buckets(30, tied_embeddings=True) == {"low": list(range(2, 15, 2)),
                                                                 "high": list(range(15, 30, 2))}
    assert candidate_layer_buckets(60) == {"low": list(range(0, 20, 2)), "high": list(range(40, 60, 2))}
    assert candidate_layer_buckets(4, tied_embeddings=True) == {"low": [2], "high": [2]}
    assert candidate_layer_buckets(3, tied_embeddings=True) == {"low": [1], "high": [1]}
    assert candidate_layer_buckets(1) == {"low": [0], "high": [0]}
    with pytest.raises(ValueError, match="n_layers"):
        candidate_layer_buckets(0)


def test_dola_with_a_bucket_name_equals_its_layers(tiny):
    with_context, _ = _ids(tiny)
    kwargs = dict(max_new_tokens=3, **QUIET)
    assert dola_generate(tiny, with_context, "low", **kwargs) == dola_generate(tiny, with_context, [2], **kwargs)


def test_dola_refuses_bad_input(tiny):
    with_context, _ = _ids(tiny)
    final, premature = torch.zeros(1, 4), torch.zeros(1, 2, 4)
    for relative_top in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="relative_top"):
            dola_scores(final, premature, relative_top)
        with pytest.raises(ValueError, match="relative_top"):
            dola_generate(tiny, with_context, [1], relative_top=relative_top, **QUIET)
    with pytest.raises(ValueError, match="premature logits"):
        dola_scores(final, torch.zeros(1, 0, 4))
    with pytest.raises(ValueError, match="empty"):
        dola_generate(tiny, with_context, [], **QUIET)
    for layers in ([1, tiny.n_layers], [-1], ["middle"]):
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            dola_generate(tiny, with_context, layers, **QUIET)
    with pytest.raises(ValueError, match="low"):
        dola_generate(tiny, with_context, "middle", **QUIET)


def test_final_norm_and_unembedding_are_read_from_the_adapter(tiny, gpt2):
    norm, unembed = final_norm_and_unembedding(tiny.bridge, tiny.hf_model)
    assert norm is tiny.hf_model.model.norm and unembed is tiny.hf_model.lm_head
    norm, unembed = final_norm_and_unembedding(gpt2.bridge, gpt2.hf_model)
    assert norm is gpt2.hf_model.transformer.ln_f and unembed is gpt2.hf_model.lm_head
    bare = SimpleNamespace(adapter=SimpleNamespace(component_mapping={}))
    with pytest.raises(UnsupportedArchitecture, match="ln_final"):
        final_norm_and_unembedding(bare, tiny.hf_model)
