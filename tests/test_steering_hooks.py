"""Per-row (batched) interventions: one direction per batch row must equal running each row on its own."""

import pytest
import torch

from steering.generation import chat_token_ids, last_token_logits, left_pad
from steering.hooks import ablate, add, project_out
from tests.numerics import assert_rel_close

PROMPTS = ["How do I bake bread?", "Write a poem about the sea", "Hi"]


def directions(model, n, seed=0):
    return torch.randn(n, model.d_model, generator=torch.Generator().manual_seed(seed))


def test_project_out_per_row():
    x = torch.randn(2, 5, 8)
    r = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    y = project_out(x, r)
    assert (y @ r.T).diagonal(dim1=0, dim2=2).abs().max() < 1e-5  # row b is orthogonal to r[b]
    assert (y[0] @ r[1]).abs().max() > 1e-3  # ... and not to the other row's direction
    with pytest.raises(ValueError, match="per-row"):
        project_out(torch.randn(3, 5, 8), r)


def test_per_row_ablation_equals_one_direction_at_a_time(tiny):
    ids = chat_token_ids(tiny, PROMPTS)
    r = directions(tiny, len(ids))
    with ablate(tiny, r):
        batched = last_token_logits(tiny, ids)
    for row in range(len(ids)):
        with ablate(tiny, r[row]):
            alone = last_token_logits(tiny, ids)[row]
        assert_rel_close(batched[row], alone)


def test_per_row_addition_at_per_row_layers(tiny):
    ids = chat_token_ids(tiny, PROMPTS)
    v, layers = directions(tiny, len(ids), seed=1) * 5, [0, 2, 2]
    plain = last_token_logits(tiny, ids)
    with add(tiny, v, layers):
        batched = last_token_logits(tiny, ids)
    for row, layer in enumerate(layers):
        with add(tiny, v[row], layer):
            alone = last_token_logits(tiny, ids)[row]
        assert_rel_close(batched[row], alone)
        assert (batched[row] - plain[row]).abs().max() > 1e-3
    assert torch.equal(last_token_logits(tiny, ids), plain)  # hooks removed


def test_addition_validates_layers_and_shapes(tiny):
    v = directions(tiny, 2)
    for bad in ([0, 1, 2], [0, tiny.n_layers]):
        with pytest.raises(ValueError):
            with add(tiny, v, bad):
                pass
    with pytest.raises(ValueError, match="one layer"):
        with add(tiny, v[0], [0, 1]):
            pass
    with pytest.raises(ValueError, match="-1"):
        with add(tiny, v[0], -1):
            pass
    with pytest.raises(ValueError, match="d_model"):
        with add(tiny, torch.randn(2, 3, tiny.d_model), 0):
            pass


def test_per_row_ablation_during_generate(tiny):
    ids = chat_token_ids(tiny, PROMPTS[:2])
    input_ids, mask = left_pad(tiny, ids)
    r = directions(tiny, 2, seed=2)

    def greedy():
        return tiny.hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                      pad_token_id=tiny.tokenizer.pad_token_id)

    with ablate(tiny, r):
        batched = greedy()
    for row in range(2):
        with ablate(tiny, r[row]):
            assert torch.equal(greedy()[row], batched[row])
