"""steering.hooks: ablating and adding a direction (one for the batch, or one per batch row), in forward passes and
during generate, hooks gone afterwards, bad directions refused."""

import pytest
import torch

from probes.cache import extract, residual_hooks
from probes.forward import chat_token_ids, last_token_logits, pad_id, pad_token_ids
from steering.hooks import ablate, add, project_out
from tests.helpers import padded_logits
from tests.numerics import assert_rel_close

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon"]
ROW_PROMPTS = ["How do I bake bread?", "Write a poem about the sea", "Hi"]  # one direction per row


def a_direction(model, seed=0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


def directions(model, n, seed=0):
    return torch.randn(n, model.d_model, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- one direction


def test_ablation_keeps_the_residual_stream_orthogonal(embedded):
    r = a_direction(embedded)
    with ablate(embedded, r):
        cache = extract(embedded, PROMPTS, hooks=residual_hooks(embedded), positions=[-3, -2, -1], progress=False)
    cos = (cache.acts @ (r / r.norm())).abs() / cache.acts.norm(dim=-1)
    assert cos.max() < 1e-5
    plain = extract(embedded, PROMPTS, positions=[-1], progress=False)
    assert ((plain.acts @ (r / r.norm())).abs() / plain.acts.norm(dim=-1)).max() > 1e-3  # hooks were removed


def test_addition_with_zero_coefficient_changes_nothing_and_hooks_go_away(embedded):
    r = a_direction(embedded)
    before = padded_logits(embedded, PROMPTS)
    with add(embedded, r, layer=5, coeff=0.0):
        assert torch.equal(padded_logits(embedded, PROMPTS), before)
    with add(embedded, r, layer=5, coeff=8.0):
        assert (padded_logits(embedded, PROMPTS) - before).abs().max() > 1e-2
    with pytest.raises(RuntimeError):
        with ablate(embedded, r):
            raise RuntimeError("boom")
    assert torch.equal(padded_logits(embedded, PROMPTS), before)


def test_interventions_act_during_generate(embedded):
    enc = embedded.tokenizer([embedded.format_chat("Name a colour.")], return_tensors="pt").to(embedded.device)
    plain = embedded.hf_model.generate(**enc, max_new_tokens=6, do_sample=False)
    with add(embedded, a_direction(embedded) * 50, layer=3):
        steered = embedded.hf_model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, steered)


def test_side_by_side_has_a_column_per_edit_and_leaves_no_hook(tiny):
    from probes.forward import generate, side_by_side

    prompts = ["Name a colour.", "Count to three."]
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    table = side_by_side(tiny, prompts, {"baseline": None, "added": lambda: add(tiny, r * 100, 1)}, 4, progress=False)
    assert list(table.columns) == ["instruction", "baseline", "added"] and list(table.instruction) == prompts
    assert list(table.baseline) == generate(tiny, prompts, 4, progress=False) != list(table.added)


def test_bad_directions_are_refused(embedded):
    with pytest.raises(ValueError, match="d_model=576"):
        with ablate(embedded, torch.randn(100)):
            pass
    with pytest.raises(ValueError, match="zero"):
        with ablate(embedded, torch.zeros(576)):
            pass
    with pytest.raises(ValueError, match="layer"):
        with add(embedded, torch.randn(576), layer=30):
            pass


# ------------------------------------------------------------------------------- one direction per batch row


def test_project_out_per_row():
    x = torch.randn(2, 5, 8)
    r = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    y = project_out(x, r)
    assert (y @ r.T).diagonal(dim1=0, dim2=2).abs().max() < 1e-5  # row b is orthogonal to r[b]
    assert (y[0] @ r[1]).abs().max() > 1e-3  # ... and not to the other row's direction
    with pytest.raises(ValueError, match="per-row"):
        project_out(torch.randn(3, 5, 8), r)


def test_per_row_ablation_equals_one_direction_at_a_time(tiny):
    ids = chat_token_ids(tiny, ROW_PROMPTS)
    r = directions(tiny, len(ids))
    with ablate(tiny, r):
        batched = last_token_logits(tiny, ids)
    for row in range(len(ids)):
        with ablate(tiny, r[row]):
            alone = last_token_logits(tiny, ids)[row]
        assert_rel_close(batched[row], alone)


def test_per_row_addition_at_per_row_layers(tiny):
    ids = chat_token_ids(tiny, ROW_PROMPTS)
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
    ids = chat_token_ids(tiny, ROW_PROMPTS[:2])
    input_ids, mask = pad_token_ids(ids, pad_id(tiny), "left", tiny.device)
    r = directions(tiny, 2, seed=2)

    def greedy():
        return tiny.hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                      pad_token_id=tiny.tokenizer.pad_token_id)

    with ablate(tiny, r):
        batched = greedy()
    for row in range(2):
        with ablate(tiny, r[row]):
            assert torch.equal(greedy()[row], batched[row])
