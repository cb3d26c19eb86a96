"""The one forward path (probes.forward): padding, teacher-forced losses against float64, batched generation, and
extract's every-token mode against hidden_states."""

import pytest
import torch

from probes.cache import ActivationCache, extract, extract_group_means, residual_hooks
from probes.conflict import ConflictExample, conflict_prompts
from probes.forward import (
    IGNORE,
    PAD_MULTIPLE,
    SHARED_PREFIX_MIN,
    answer_batch,
    answer_loss,
    answer_nll,
    chat_token_ids,
    common_prefix_length,
    generate,
    kl_divergence,
    pad_id,
    pad_token_ids,
    position_ids,
    teacher_forced_logprobs,
)
from tests.numerics import assert_rel_close

ROWS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
INSTRUCTIONS = ["Name a river.", "Say something kind about the sea, please."]
ANSWERS = ["The Nile.", "The sea is calm and wide today."]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_puts_each_row_on_its_side_of_a_multiple_of_eight(side):
    input_ids, mask = pad_token_ids(ROWS, 0, side)
    assert input_ids.shape == (3, 2 * PAD_MULTIPLE) and mask.dtype == torch.long
    assert mask.sum(1).tolist() == [len(r) for r in ROWS]
    for r, row in enumerate(ROWS):
        real = input_ids[r][mask[r].bool()].tolist()
        assert real == row and (input_ids[r][~mask[r].bool()] == 0).all()
        first = mask[r].nonzero()[0].item()
        assert first == (0 if side == "right" else 16 - len(row))  # real tokens are contiguous on their side
    exact, _ = pad_token_ids(ROWS, 2, side, multiple=1)
    assert exact.shape == (3, 9) and (exact == 2).sum() == 27 - sum(map(len, ROWS))


def test_padding_refuses_bad_input_and_position_ids_skip_left_padding():
    with pytest.raises(ValueError, match="side"):
        pad_token_ids(ROWS, 0, "middle")
    with pytest.raises(ValueError, match="no token-id lists"):
        pad_token_ids([], 0)
    _, mask = pad_token_ids([[1, 2], [3]], 0, "left", multiple=4)
    assert position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]


def _pairs(model):
    eos = model.tokenizer.eos_token
    return list(zip(chat_token_ids(model, INSTRUCTIONS),
                    [model.tokenizer(a + eos, add_special_tokens=False)["input_ids"] for a in ANSWERS], strict=True))


def _reference_nll(model, pairs) -> torch.Tensor:
    """Per answer token, each sequence alone through the plain model, log-softmax in float64."""
    out = []
    for prompt, answer in pairs:
        seq = torch.tensor([prompt + answer], device=model.device)
        with torch.no_grad():
            logits = model.hf_model(seq).logits[0].double()
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
        out.append(-logprobs.gather(-1, seq[0, len(prompt):, None]).squeeze(-1))
    return torch.cat(out)


def test_teacher_forced_losses_equal_a_float64_reference(tiny):
    pairs = _pairs(tiny)
    batch = answer_batch(pairs, pad_id(tiny), tiny.device)
    assert batch["input_ids"].shape[1] == max(len(p) + len(t) for p, t in pairs)  # no rounding up: plain shapes
    assert (batch["labels"] != IGNORE).sum() == sum(len(t) for _, t in pairs)
    with torch.no_grad():
        logits = tiny.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = _reference_nll(tiny, pairs)
    assert_rel_close(answer_nll(logits, batch["labels"], reduction="none"), reference)
    assert answer_nll(logits, batch["labels"]).item() == pytest.approx(reference.sum().item(), rel=1e-5)
    assert answer_loss(tiny, INSTRUCTIONS, ANSWERS, batch_size=1) == pytest.approx(reference.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="one answer per instruction"):
        answer_loss(tiny, INSTRUCTIONS, ANSWERS[:1])


def test_kl_divergence_equals_a_float64_reference():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    other = logits + 0.3 * torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    p, q = teacher_forced_logprobs(logits), teacher_forced_logprobs(other)
    assert p.shape == (2, 4, 11) and torch.equal(kl_divergence(p, p), torch.zeros(2, 4))
    ref_p, ref_q = (torch.log_softmax(x[:, :-1].double(), -1) for x in (logits, other))
    assert_rel_close(kl_divergence(p, q), (ref_p.exp() * (ref_p - ref_q)).sum(-1))


def _fact(question: str) -> ConflictExample:
    return ConflictExample(question, "Oslo is located in Chile.", ("Norway",), "Oslo is located in Chile.", ("Chile",))


def test_batched_generation_equals_one_at_a_time(tiny):
    prompts = conflict_prompts([_fact("In which country is Oslo?"), _fact("Where is Lima?")], "sub")
    prompts.append("question: x\nanswer:")
    answers = dict(max_new_tokens=6, progress=False, chat=False, first_line=True)
    batched = generate(tiny, prompts, batch_size=3, **answers)
    assert batched == [generate(tiny, [p], **answers)[0] for p in prompts]
    assert all("\n" not in a for a in batched)
    chat = generate(tiny, INSTRUCTIONS, max_new_tokens=5, progress=False)
    assert chat == [generate(tiny, [i], max_new_tokens=5, progress=False)[0] for i in INSTRUCTIONS]
    with pytest.raises(ValueError, match="no prompts"):
        generate(tiny, [], chat=False)


def test_a_shared_prefix_runs_once_and_gives_the_same_answers(tiny):
    """Few-shot prompts share their demonstrations: reusing the prefix's KV cache gives the answers of the full
    prompts, batched or alone, and a last-token edit skips the prefix pass."""
    from steering.spare import add_edit, edit_last_token

    prompts = conflict_prompts([_fact("In which country is Oslo?"), _fact("Where is Lima?"), _fact("Is it far?")],
                               "sub")
    ids = [tiny.tokenizer(p)["input_ids"] for p in prompts]
    assert common_prefix_length(ids) >= SHARED_PREFIX_MIN
    answers = dict(max_new_tokens=6, progress=False, chat=False, first_line=True)
    plain = generate(tiny, prompts, batch_size=3, **answers)
    assert generate(tiny, prompts, batch_size=3, share_prefix=True, **answers) == plain
    assert generate(tiny, prompts, batch_size=1, share_prefix=True, **answers) == plain
    seen = []
    edit = add_edit(torch.full((tiny.d_model,), 4.0), 1.0)
    with edit_last_token(tiny, {"blocks.1.hook_resid_pre": lambda h: seen.append(h.shape) or edit(h)}, False):
        edited = generate(tiny, prompts, batch_size=3, **answers)
        seen_plain, seen[:] = list(seen), []
        assert generate(tiny, prompts, batch_size=3, share_prefix=True, **answers) == edited
    assert len(seen) == len(seen_plain) == 1  # one prompt pass edited either way; the prefix pass was skipped


def test_first_line_answers_stop_once_the_line_is_complete(tiny):
    """Forced continuation "\n", " Paris", "\n", ...: a leading line break does not end the answer, the one after
    "Paris" does, and generation stops there (3 steps, not 8) with the answer a full run gives."""
    tok = tiny.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
    forced = [newline, tok(" Paris", add_special_tokens=False)["input_ids"][0], newline]
    steps = []

    def force(module, args, logits):
        step = len(steps)
        steps.append(step)
        logits = logits.clone()
        logits[:, -1, forced[min(step, 2)] if step < 3 else forced[1]] += 1e4
        return logits

    handle = tiny.hf_model.get_output_embeddings().register_forward_hook(force)
    try:
        answer = generate(tiny, ["question: x\nanswer:"], max_new_tokens=8, progress=False, chat=False,
                          first_line=True)
        stopped_after = len(steps)
        steps.clear()
        full = generate(tiny, ["question: x\nanswer:"], max_new_tokens=8, progress=False, chat=False)
    finally:
        handle.remove()
    assert answer == ["Paris"] and stopped_after == 3
    assert full[0].strip().split("\n")[0] == "Paris" and len(steps) == 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_token_extract_equals_hidden_states(tiny, side):
    texts = ["a short one", "a somewhat longer text with more tokens in it", "x"]
    hooks = residual_hooks(tiny)[:-1]  # hidden_states[-1] has the final norm applied
    cache = extract(tiny, texts, hooks, positions="all", padding_side=side, batch_tokens=16, progress=False)
    lengths = [len(tiny.tokenizer(t)["input_ids"]) for t in texts]
    assert cache.meta["lengths"] == lengths and cache.acts.shape == (sum(lengths), len(hooks), tiny.d_model)
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert cache.first_tokens().nonzero().flatten().tolist() == starts
    for text, start, n in zip(texts, starts, lengths, strict=True):
        with torch.no_grad():
            hidden = tiny.hf_model(**tiny.tokenizer(text, return_tensors="pt").to(tiny.device),
                                   output_hidden_states=True).hidden_states
        assert_rel_close(cache.acts[start:start + n], torch.stack(hidden[:tiny.n_layers], 2)[0], dim=-1)


def test_every_token_cache_saves_and_loads(tiny, tmp_path):
    cache = extract(tiny, ["one two", "three"], ["blocks.1.hook_resid_pre"], positions="all", progress=False)
    loaded = ActivationCache.load(cache.save(tmp_path / "all.safetensors"), "cpu", positions="all")
    assert torch.equal(loaded.acts, cache.acts.cpu()) and loaded.meta["lengths"] == cache.meta["lengths"]
    with pytest.raises(ValueError, match="positions='all'"):
        extract_group_means(tiny, ["a", "b"], [0, 1], positions="all")
    with pytest.raises(ValueError, match="every token"):
        extract(tiny, ["a"], ["blocks.1.hook_resid_pre"], progress=False).first_tokens()
