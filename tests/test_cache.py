import pytest
import torch

from probes import cache
from probes.cache import (
    ActivationCache,
    CacheError,
    ShardedActivationCache,
    extract,
    extract_group_means,
    residual_hooks,
)
from probes.forward import pad_id, pad_token_ids
from probes.positions import mark_span
from tests.numerics import assert_rel_close, rel_err

PROMPTS = ["The Eiffel Tower is located in the city of", "Hi there", "What is the location of the Golden Gate Bridge?",
           "Tokyo is the capital of"]
ENTITIES = [mark_span(t, e) for t, e in [("Where is {entity}?", "Mount Everest"),
                                         ("{entity} is a lake", "Lake Titicaca"),
                                         ("Tell me about {entity} please", "the Sahara desert")]]


def hidden_same_batch(model, prompts, side):
    """HF output_hidden_states for the very batch extract builds: [n, n_layers + 1, seq, d] and the mask."""
    ids = [model.tokenizer(p)["input_ids"] for p in prompts]
    input_ids, mask = pad_token_ids(ids, pad_id(model), side, model.device)
    with torch.inference_mode():
        hidden = model.hf_model(input_ids=input_ids, attention_mask=mask,
                                position_ids=(mask.cumsum(1) - 1).clamp(min=0), output_hidden_states=True).hidden_states
    return torch.stack(hidden, 1), mask


def hidden_alone(model, prompt):
    ids = model.tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        return torch.stack(model.hf_model(**ids, output_hidden_states=True).hidden_states, 1)[0]


def token_index(mask, row, i):
    """Padded index of the i-th real token of a row (negative i counts from the end)."""
    real = mask[row].nonzero().flatten()
    return real[i]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_matches_hidden_states_for_every_layer(embedded, side):
    hooks = residual_hooks(embedded)[:-1]  # hidden_states[-1] of HF has the final norm applied
    cache = extract(embedded, PROMPTS, hooks=hooks, padding_side=side, batch_tokens=10_000, progress=False)
    hidden, mask = hidden_same_batch(embedded, PROMPTS, side)
    assert cache.acts.shape == (len(PROMPTS), embedded.n_layers, embedded.d_model)
    for row in range(len(PROMPTS)):
        ref = hidden[row, :embedded.n_layers, token_index(mask, row, -1)]
        assert_rel_close(cache.acts[row], ref, dim=-1)
        alone = hidden_alone(embedded, PROMPTS[row])[:embedded.n_layers, -1]
        assert_rel_close(cache.acts[row], alone, dim=-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_negative_positions_match_hidden_states(embedded, side):
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    cache = extract(embedded, prompts, hooks=residual_hooks(embedded, range(embedded.n_layers)),
                    positions=[-3, -2, -1], padding_side=side, progress=False)
    hidden, mask = hidden_same_batch(embedded, prompts, side)
    assert cache.acts.shape == (3, 3, embedded.n_layers, embedded.d_model)
    for row in range(3):
        for p, offset in enumerate([-3, -2, -1]):
            ref = hidden[row, :embedded.n_layers, token_index(mask, row, offset)]
            assert_rel_close(cache.acts[row, p], ref, dim=-1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["span_last", "span_mean"])
def test_span_positions_match_hidden_states(embedded, side, mode):
    prompts, spans = [p for p, _ in ENTITIES], [s for _, s in ENTITIES]
    hooks = ["blocks.0.hook_resid_pre", "blocks.7.hook_resid_post", "blocks.20.hook_resid_pre"]
    cache = extract(embedded, prompts, hooks=hooks, positions=mode, spans=spans, padding_side=side, progress=False)
    hidden, mask = hidden_same_batch(embedded, prompts, side)
    for row, (prompt, (a, b)) in enumerate(ENTITIES):
        enc = embedded.tokenizer(prompt, return_offsets_mapping=True)
        toks = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b and e > a]
        entity_text = embedded.tokenizer.decode([enc["input_ids"][i] for i in toks]).strip()
        assert entity_text == prompt[a:b]
        idx = [token_index(mask, row, i) for i in toks]
        for slot, layer in enumerate([0, 8, 20]):
            states = hidden[row, layer, idx]
            ref = states[-1] if mode == "span_last" else states.mean(0)
            assert_rel_close(cache.acts[row, slot], ref)


def test_last_resid_post_and_other_hooks_agree_with_bridge(embedded):
    ids = embedded.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"].to(embedded.device)
    names = ["blocks.29.hook_resid_post", "blocks.4.hook_mlp_out", "blocks.2.hook_attn_out"]
    with torch.inference_mode():
        _, ref = embedded.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    fast = extract(embedded, PROMPTS[:1], hooks=names[:1], progress=False)
    assert_rel_close(fast.acts[0, 0], ref[names[0]][0, -1])
    other = extract(embedded, PROMPTS[:1], hooks=names[1:], progress=False)
    for slot, name in enumerate(names[1:]):
        assert_rel_close(other.acts[0, slot], ref[name][0, -1])


def test_mlp_neurons_and_pattern_hooks(embedded):
    neurons = extract(embedded, PROMPTS[:2], hooks=["blocks.3.mlp.hook_post", "blocks.5.mlp.hook_post"],
                      progress=False)
    assert neurons.acts.shape == (2, 2, embedded.hf_model.config.intermediate_size)
    with pytest.raises(ValueError, match="different widths"):
        extract(embedded, PROMPTS[:2], hooks=["blocks.3.mlp.hook_post", "blocks.3.hook_resid_mid"], progress=False)
    with pytest.raises(ValueError, match=r"\[batch, seq, width\]"):
        extract(embedded, PROMPTS[:2], hooks=["blocks.3.attn.hook_pattern"], progress=False)


def test_forward_stops_after_last_requested_layer(embedded):
    ran = []
    handle = embedded.hf_model.model.layers[10].register_forward_hook(lambda *a: ran.append(1))
    try:
        extract(embedded, PROMPTS, hooks=["blocks.3.hook_resid_post", "blocks.9.hook_resid_post"], progress=False)
        assert ran == []
        extract(embedded, PROMPTS[:1], hooks=["blocks.10.hook_resid_post"], progress=False)
        assert ran == [1]
    finally:
        handle.remove()


def test_dtype_option(embedded):
    full = extract(embedded, PROMPTS, progress=False)
    half = extract(embedded, PROMPTS, dtype=torch.bfloat16, progress=False)
    assert half.acts.dtype == torch.bfloat16 and half.acts.shape == full.acts.shape
    assert ((half.acts.float() - full.acts).abs() / (full.acts.abs() + 1)).max() < 1e-2


def test_save_load_round_trip_and_checks(embedded, tmp_path):
    cache = extract(embedded, PROMPTS, progress=False)
    path = cache.save(tmp_path / "acts.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    again = ActivationCache.load(path, embedded.device, model="embedded", hooks=cache.hook_names, positions="last",
                                 prompts=PROMPTS, dtype=torch.float32)
    assert torch.equal(again.acts, cache.acts) and again.hook_names == cache.hook_names
    assert torch.equal(again["blocks.5.hook_resid_pre"], cache.acts[:, 5])
    with pytest.raises(CacheError, match="prompts_sha256"):
        ActivationCache.load(path, prompts=PROMPTS[::-1])
    with pytest.raises(CacheError, match="model"):
        ActivationCache.load(path, model="random:llama-tiny", positions=[-1])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CacheError, match="truncated"):
        ActivationCache.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CacheError):
        ActivationCache.load(garbage)
    with pytest.raises(FileNotFoundError):
        ActivationCache.load(tmp_path / "missing.safetensors")


def test_large_cache_spills_to_disk_in_shards(embedded, tmp_path):
    prompts = PROMPTS * 3
    dense = extract(embedded, prompts, progress=False)
    row_bytes = dense.acts[0].numel() * 4
    with pytest.raises(ValueError, match="spill_dir"):
        extract(embedded, prompts, max_device_bytes=5 * row_bytes, progress=False)
    sharded = extract(embedded, prompts, max_device_bytes=5 * row_bytes, spill_dir=tmp_path / "spill",
                      progress=False)
    assert isinstance(sharded, ShardedActivationCache)
    assert len(sharded.meta["shards"]) > 1 and len(sharded) == len(prompts)
    for h, (name, acts) in enumerate(sharded.iter_layers()):
        assert name == dense.hook_names[h]
        ref = dense.acts[:, h]  # other batch shapes: equal up to float32 rounding of the row's scale
        assert_rel_close(acts, ref, dim=-1)
    with pytest.raises(CacheError, match="exists"):
        extract(embedded, prompts, max_device_bytes=5 * row_bytes, spill_dir=tmp_path / "spill", progress=False)


def test_group_means_equal_means_of_rows(embedded):
    labels = ["harmful", "harmless", "harmful", "harmless"]
    dense = extract(embedded, PROMPTS, positions=[-2, -1], progress=False)
    means = extract_group_means(embedded, PROMPTS, labels, positions=[-2, -1], progress=False)
    assert means.sums.dtype == torch.float64 and means.counts.tolist() == [2, 2]
    expected = dense.acts[[0, 2]].double().mean(0) - dense.acts[[1, 3]].double().mean(0)
    assert_rel_close(means.difference("harmful", "harmless"), expected)


def test_random_model_extraction(tiny):
    cache = extract(tiny, PROMPTS, progress=False)
    assert cache.acts.shape == (4, tiny.n_layers + 1, tiny.d_model) and torch.isfinite(cache.acts).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "empty"),
    (dict(hooks=["blocks.99.hook_resid_pre"]), "unknown hook"),
    (dict(hooks=["blocks.0.hook_nonsense"]), "unknown hook"),
    (dict(positions="first"), "unknown position mode"),
    (dict(positions=[0, 1]), "negative"),
    (dict(positions="span_mean"), "spans"),
    (dict(positions=[-50]), "before the start"),
    (dict(positions="span_last", spans=[(0, 3)]), "spans for"),
    (dict(padding_side="middle"), "padding_side"),
])
def test_bad_inputs_are_refused(embedded, kwargs, message):
    args = dict(prompts=PROMPTS, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        extract(embedded, **args)


def test_extract_cli_on_a_prompt_file(embedded, tmp_path, monkeypatch):
    from probes import extract as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: embedded)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    results = cli.main(["--prompts-file", str(prompts), "--positions=-2,-1", "--out", str(tmp_path / "run")])
    assert results["shape"] == [len(PROMPTS), 2, embedded.n_layers + 1, embedded.d_model]
    cache = ActivationCache.load(tmp_path / "run" / "activations.safetensors", embedded.device, prompts=PROMPTS,
                                 positions=[-2, -1])
    assert len(cache) == len(PROMPTS)


# One family of each kind of block on the list (plain, post-norms, parallel attention and MLP, MoE, MLA); the rest
# of probes.architecture.COMPONENT_OUTPUTS_CHECKED was checked the same way once, by hand.
CHECKED_PRESETS = ("llama-tiny", "gemma2", "gpt_neox", "qwen2_moe", "deepseek_v3")


def test_attention_and_mlp_outputs_read_on_the_plain_model_equal_the_bridge_hooks(monkeypatch):
    """The fast path reads hook_attn_out / hook_mlp_out from the writer modules; on every family allowed to, that
    equals the bridge's own hooks (the slow path), and a family outside the list (Granite) takes the bridge."""
    from probes.architecture import COMPONENT_OUTPUTS_CHECKED
    from probes.models import load_model

    prompts = ["the cat sat on the mat", "a b c", "hello world, this is a longer text"]
    classes = set()
    for preset in (*CHECKED_PRESETS, "granite"):
        model = load_model(f"random:{preset}", device="cpu")
        hooks = [h for layer in range(model.n_layers) for h in (f"blocks.{layer}.hook_attn_out",
                                                                 f"blocks.{layer}.hook_mlp_out")]
        plain = cache._plain_points(model, hooks)
        assert (plain is not None) == (preset != "granite")
        if plain is None:
            continue
        classes.add(type(model.hf_model).__name__)
        fast = cache.extract(model, prompts, hooks=hooks + ["blocks.0.hook_resid_post"], progress=False).acts
        with monkeypatch.context() as m:
            m.setattr(cache, "_plain_points", lambda *args: None)
            slow = cache.extract(model, prompts, hooks=hooks + ["blocks.0.hook_resid_post"], progress=False).acts
        assert rel_err(fast, slow) < 1e-5, preset
    assert classes <= COMPONENT_OUTPUTS_CHECKED and len(classes) == len(CHECKED_PRESETS)


NEURON_PRESETS = ("llama-tiny", "qwen2", "mistral", "gpt2", "gpt_neox", "gemma2")


def test_mlp_neurons_read_on_the_plain_model_equal_the_bridge_hook(monkeypatch):
    """``mlp.hook_post`` read from the down projection's input equals the bridge's hook on every family allowed to
    (:data:`probes.architecture.NEURON_INPUTS_CHECKED`); a mixture of experts (no single neurons) and a family off
    the list take the bridge."""
    from probes.architecture import NEURON_INPUTS_CHECKED
    from probes.models import load_model

    prompts = ["the cat sat on the mat", "a b c", "hello world, this is a longer text"]
    classes = set()
    for preset in (*NEURON_PRESETS, "phi3", "qwen2_moe"):
        model = load_model(f"random:{preset}", device="cpu")
        hooks = ["blocks.0.mlp.hook_post", f"blocks.{model.n_layers - 1}.mlp.hook_post"]
        on_plain = cache._plain_points(model, hooks) is not None
        assert on_plain == (preset in NEURON_PRESETS), preset
        if not on_plain:
            continue
        classes.add(type(model.hf_model).__name__)
        fast = cache.extract(model, prompts, hooks=hooks, progress=False).acts
        with monkeypatch.context() as m:
            m.setattr(cache, "_plain_points", lambda *args: None)
            slow = cache.extract(model, prompts, hooks=hooks, progress=False).acts
        assert rel_err(fast, slow) < 1e-5, preset
    assert classes == NEURON_INPUTS_CHECKED


def test_span_positions_do_not_run_the_tokens_after_the_span(embedded):
    """Activations at an entity do not depend on the text after it (causal), so the plan cuts each prompt there:
    the same values as the prompts written without the tail, and fewer tokens run."""
    texts = ["Paris is the capital of France", "The Eiffel Tower stands in Paris"]
    spans = [(0, 5), (4, 16)]
    plan = cache._plan(embedded, texts, None, "span_last", spans, 4096, True)
    full = [len(embedded.tokenizer(t)["input_ids"]) for t in texts]
    assert [len(ids) for ids in plan.input_ids] < full
    with_tail = extract(embedded, texts, positions="span_last", spans=spans, progress=False).acts
    heads = [t[:end] for t, (_, end) in zip(texts, spans, strict=True)]
    cut = extract(embedded, heads, positions="span_last", spans=spans, progress=False).acts
    assert rel_err(with_tail, cut) < 1e-5
