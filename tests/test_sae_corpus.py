"""SAE training corpus and all-token activations."""

import pytest
import torch

from probes.forward import generate, generate_from_ids
from probes.models import load_model
from probes.random_models import RANDOM_FAMILIES
from steering.sae_corpus import CorpusSettings, corpus, corpus_sources, token_activations
from tests.numerics import FLOAT32_REL, rel_err

SMALL = CorpusSettings(conflict_facts=4, instructions=6, answered=2, headlines=3, passages=2, continuations=3,
                       answer_tokens=3, continuation_tokens=4)


def test_corpus_mixes_every_source_in_the_asked_numbers(tiny):
    sources = corpus_sources(tiny, SMALL, progress=False)
    assert {k: len(v) for k, v in sources.items()} == {
        "conflict_prompts": 8, "instructions_with_answers": 2, "instructions": 4, "headlines": 3, "passages": 2,
        "continuations": 3}
    assert all("context:" in t and t.endswith("answer:") for t in sources["conflict_prompts"])
    chat = tiny.format_chat("x")
    assert all(t.startswith(chat[:chat.index("x")])
               for t in sources["instructions"] + sources["instructions_with_answers"])
    assert not any("<P>" in t or "</P>" in t for t in sources["passages"])
    texts = corpus(tiny, SMALL, progress=False)
    assert sorted(texts) == sorted(t for v in sources.values() for t in v)
    assert texts == corpus(tiny, SMALL, progress=False)  # seeded, sampling included
    assert texts != corpus(tiny, SMALL, seed=1, progress=False)


def test_corpus_settings_refuse_negative_counts_and_greedy_sampling():
    with pytest.raises(ValueError, match="counts"):
        CorpusSettings(headlines=-1)
    with pytest.raises(ValueError, match="temperature"):
        CorpusSettings(temperature=0)


def test_sampled_generation_is_seeded_and_greedy_is_the_default(tiny):
    prompts = ["Tell me about rivers.", "Name a colour."]
    one = generate(tiny, prompts, 6, progress=False, temperature=1.0, seed=3)
    assert one == generate(tiny, prompts, 6, progress=False, temperature=1.0, seed=3)
    assert one != generate(tiny, prompts, 6, progress=False, temperature=1.0, seed=4)
    greedy = generate(tiny, prompts, 6, progress=False)
    assert greedy == generate(tiny, prompts, 6, progress=False, temperature=0.0, seed=9)
    ids = [tiny.tokenizer("The river")["input_ids"]]
    assert len(generate_from_ids(tiny, ids, 4, progress=False)) == 1
    with pytest.raises(ValueError):
        generate_from_ids(tiny, ids, 4, progress=False, temperature=-1)


def test_token_activations_equal_hidden_states_at_real_tokens_after_the_first(tiny):
    texts = ["a short one", "a somewhat longer text with more tokens in it"]
    acts = token_activations(tiny, texts, layers=[0, 2], batch_size=2, progress=False)
    lengths = [len(tiny.tokenizer(t)["input_ids"]) - 1 for t in texts]  # the first token (attention sink) is skipped
    for layer in (0, 2):
        assert acts[layer].shape == (sum(lengths), tiny.d_model)
        with torch.no_grad():
            alone = tiny.hf_model(tiny.tokenizer(texts[1], return_tensors="pt").input_ids.to(tiny.device),
                                  output_hidden_states=True).hidden_states[layer][0]
        torch.testing.assert_close(acts[layer][lengths[0]:], alone[1:].float(), atol=1e-4, rtol=1e-4)
    assert token_activations(tiny, texts, [1], max_tokens=5, progress=False)[1].shape[0] == 5
    with pytest.raises(ValueError):
        token_activations(tiny, texts, [tiny.n_layers])
    with pytest.raises(ValueError):
        token_activations(tiny, [], [0])


@pytest.mark.parametrize("family", sorted(RANDOM_FAMILIES))
def test_token_activations_read_the_residual_entering_each_block_on_every_family(family):
    model = load_model(f"random:{family}", device="cpu")
    texts = ["one text", "a second and longer text to read"]
    layers = [0, model.n_layers - 1]
    acts = token_activations(model, texts, layers, batch_size=2, progress=False)
    with torch.no_grad():
        hidden = model.hf_model(**model.tokenizer(texts[1], return_tensors="pt"),
                                output_hidden_states=True).hidden_states
    for layer in layers:
        tail = acts[layer][-hidden[layer].shape[1] + 1:]  # the second text's tokens after the first
        assert rel_err(tail, hidden[layer][0, 1:].float()) < FLOAT32_REL
