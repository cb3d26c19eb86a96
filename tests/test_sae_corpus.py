"""SAE training corpus and all-token activations."""

import pytest
import torch

from steering.sae_corpus import corpus, token_activations


def test_corpus_mixes_conflict_prompts_instructions_answers_and_headlines(tiny):
    texts = corpus(tiny, n_conflict=4, n_instructions=6, n_answers=2, n_headlines=3, progress=False)
    assert len(texts) == 4 * 2 + 6 + 3
    assert sum("context:" in t for t in texts) == 8
    assert sum(tiny.tokenizer.eos_token in t or "<|" in t for t in texts) >= 6  # chat-formatted ones
    assert texts == corpus(tiny, n_conflict=4, n_instructions=6, n_answers=2, n_headlines=3, progress=False)


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
