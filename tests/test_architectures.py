"""Every intervention on every architecture family: tiny random models built from configs (norm gains and biases
randomised), one per family, checked against the hooks, the bridge and plain ``transformers``.

The per-family numbers these tests measure (residual projection under ablate and under the weight edit, logits of
the edit vs the hooks, KL on post-norm families) are printed by ``python -m bench.architectures``.
"""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, MambaConfig

from probes.architecture import UnsupportedArchitecture
from probes.cache import extract, residual_hooks
from probes.models import RANDOM_FAMILIES, build_random_model, load_model
from steering.hooks import ablate, add
from steering.organism import lora_config
from steering.orthogonalize import orthogonalize, save_checkpoint
from tests.numerics import FLOAT32_REL, FLOAT64_REL, assert_rel_close, rel_err

FAMILIES = sorted(RANDOM_FAMILIES)
REQUIRED = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "olmo2", "gpt2", "gpt_neox",
            "mixtral", "qwen3_moe"}
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}
MOE = {"mixtral", "qwen3_moe", "qwen2_moe"}
PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon"]


def direction(model, seed=0):
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return r / r.norm()


def run(model, prompts=PROMPTS):
    """Logits at every real token [tokens, vocab], and the residual stream as rows of width d: entering each block at
    every real token, and leaving the last block (before the final norm) at the last tokens of each prompt."""
    enc = model.tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    keep = enc["attention_mask"].bool()
    with torch.inference_mode():
        out = model.hf_model(**enc, output_hidden_states=True)
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"
    n = int(keep.sum(1).min())
    resid = torch.stack(out.hidden_states[:-1])[:, keep]
    tail = extract(model, prompts, hooks=[last], positions=list(range(-n, 0)), dtype=model.dtype, progress=False).acts[:, :, 0]
    return out.logits[keep], torch.cat([resid.reshape(-1, model.d_model), tail.reshape(-1, model.d_model)])


def projection(resid, r):
    """Largest |x . r| / |x| over every layer and token."""
    return float(((resid.double() @ r.to(resid.device)).abs() / resid.double().norm(dim=-1)).max())


def kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_families_cover_the_required_architectures():
    assert REQUIRED <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_layout_and_ablation_keeps_the_residual_stream_orthogonal(family):
    model = load_model(f"random:{family}", device="cpu")  # float32, as users run it
    arch = model.architecture
    assert len(arch.blocks) == model.n_layers == 3
    per_block = [w for w in arch.writers if w.layer is not None]
    assert len(per_block) == 2 * model.n_layers and {w.kind for w in per_block} == {"attn", "mlp"}
    assert arch.post_norm == (family in POST_NORM)
    r = direction(model)
    _, plain = run(model)
    with ablate(model, r):
        _, hooked = run(model)
    assert projection(plain, r) > 1e-2
    assert projection(hooked, r) < 1e-5  # float32: every layer, every token, relative to the activation's size


@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonalize_equals_hooks_or_keeps_the_stream_orthogonal_and_reloads(family, tmp_path):
    model = load_model(f"random:{family}", device="cpu", dtype="float64")
    r = direction(model, seed=1)
    plain_logits, _ = run(model)
    with ablate(model, r):
        hooked_logits, _ = run(model)
    assert rel_err(plain_logits, hooked_logits) > 1e-3
    orthogonalize(model, r)
    edited_logits, edited = run(model)
    if family in POST_NORM:
        # the post-norm rescales each output: the stream stays orthogonal (their RMSNorm computes in float32), the
        # logits move by a small KL from the hooks'
        assert not model.extra["orthogonalized"]["exact"]
        assert projection(edited, r) < 1e-6
        assert 0 < kl(hooked_logits, edited_logits) < kl(hooked_logits, plain_logits)
    else:
        assert model.extra["orthogonalized"]["exact"]
        assert projection(edited, r) < 1e-12
        assert_rel_close(edited_logits, hooked_logits, FLOAT64_REL)
    path = save_checkpoint(model, tmp_path / "ckpt", r, layer=1, position=-1)
    eager = {"experts_implementation": "eager"} if family in MOE else {}  # grouped expert matmuls: no float64 kernel
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, **eager)
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        again = reloaded(**enc).logits[enc["attention_mask"].bool()]
    assert_rel_close(again, edited_logits, FLOAT64_REL)


@pytest.mark.parametrize("family", sorted(REQUIRED - POST_NORM))
def test_orthogonalize_in_float32_matches_the_hooks(family):
    model = load_model(f"random:{family}", device="cpu")
    r = direction(model, seed=2)
    with ablate(model, r):
        hooked, _ = run(model)
    orthogonalize(model, r)
    assert_rel_close(run(model)[0], hooked, 1e-5)


# transformer-lens 3.9's own Cohere forward drifts from transformers' (0.3% of the residual after one block, 0.9% of
# the logits); the workbench follows transformers there, so the bridge is no reference for Cohere's activations.
BRIDGE_DRIFTS = {"cohere"}


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - BRIDGE_DRIFTS))
def test_writers_and_extraction_agree_with_the_bridge(family):
    """The modules the workbench hooks output what the bridge calls hook_attn_out / hook_mlp_out, and extract gives
    the bridge's activations for the residual stream and the other hook names it accepts."""
    model = load_model(f"random:{family}", device="cpu")
    ids = model.tokenizer(PROMPTS[1:], return_tensors="pt")["input_ids"]
    names = [*residual_hooks(model), "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    names += [n for n in ("blocks.1.mlp.hook_post",) if n in model.bridge.hook_dict]
    names = [n for n in names if n in model.bridge.hook_dict]
    with torch.inference_mode():
        _, ref = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    assert set(names) <= set(ref.keys()), "the bridge offers these hooks for this family"
    for name in names:
        got = extract(model, PROMPTS[1:], hooks=[name], progress=False).acts[0, 0]
        assert_rel_close(got, ref[name][0, -1])
    captured = {}
    hooks = [w.module.register_forward_hook(lambda m, a, o, k=(w.kind, w.layer): captured.__setitem__(
        k, (o[0] if isinstance(o, tuple) else o).clone())) for w in model.architecture.writers]  # Falcon adds in place
    try:
        with torch.inference_mode():
            model.hf_model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for kind in ("attn", "mlp"):
        ours, theirs = captured[(kind, 1)][0, -1].double(), ref[f"blocks.1.hook_{kind}_out"][0, -1].double()
        # same direction (Granite scales the output by its residual multiplier after the module)
        assert float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0)) > 1 - 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_add_lands_on_the_residual_stream_entering_the_block(family):
    model = load_model(f"random:{family}", device="cpu")
    v = direction(model, seed=3).float() * 3
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    before = extract(model, PROMPTS, hooks=hooks, positions=[-2, -1], progress=False).acts
    with add(model, v, layer=2):
        after = extract(model, PROMPTS, hooks=hooks, positions=[-2, -1], progress=False).acts
    assert torch.equal(after[:, :, 0], before[:, :, 0])
    assert_rel_close(after[:, :, 1] - before[:, :, 1], v.expand_as(before[:, :, 1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_the_architectures_projections(family):
    model = load_model(f"random:{family}", device="cpu")
    targets = model.architecture.lora_targets
    assert targets
    peft_model = get_peft_model(model.hf_model, lora_config(model, 2, [1]))
    adapted = {n for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted and all(f".{model.architecture.block_path.rsplit('.', 1)[-1]}.1." in n for n in adapted)
    ids = model.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_an_unsupported_architecture_is_a_clear_error():
    config = MambaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, state_size=4)
    model = build_random_model(config, device="cpu")
    with pytest.raises(UnsupportedArchitecture, match="MambaForCausalLM"):
        model.architecture
    with pytest.raises(UnsupportedArchitecture, match="MambaForCausalLM"):
        with ablate(model, torch.randn(model.d_model)):
            pass


@pytest.mark.parametrize("family", sorted(REQUIRED))
def test_refusal_pipeline_runs_end_to_end(family, tmp_path):
    from steering import refusal

    model = load_model(f"random:{family}", device="cpu")
    results = refusal.run(model, tmp_path, n_train=6, n_val=4, n_test=4, max_new_tokens=3, progress=False)
    assert results["orthogonalization"]["exact"] == (family not in POST_NORM)
    if family in POST_NORM:
        assert results["kl_orthogonalized_vs_hooks"] > 0
    else:
        assert results["rel_logit_diff_orthogonalized_vs_hooks"] < FLOAT32_REL
    card = (tmp_path / "checkpoint" / "README.md").read_text()
    assert ("post-norm" in card) == (family in POST_NORM) and "KL(hooks || weights)" in card
    reloaded = AutoModelForCausalLM.from_pretrained(results["checkpoint"])
    assert type(reloaded).__name__ == model.architecture.name


@pytest.mark.parametrize("family", FAMILIES)
def test_spare_edits_land_at_the_last_token_of_a_resid_post_point(family):
    from steering import spare

    model = load_model(f"random:{family}", device="cpu")
    v = direction(model, seed=4).float() * 2
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    left = dict(hooks=hooks, positions=[-2, -1], padding_side="left", progress=False)  # as generation pads
    before = extract(model, PROMPTS, **left).acts
    with spare.edit_last_token(model, {"blocks.1.hook_resid_post": spare.add_edit(v, 1.0)}, generated=False):
        after = extract(model, PROMPTS, **left).acts
    assert torch.equal(after[:, :, 0], before[:, :, 0]) and torch.equal(after[:, 0, 1], before[:, 0, 1])
    assert_rel_close(after[:, 1, 1] - before[:, 1, 1], v.expand_as(before[:, 1, 1]))
