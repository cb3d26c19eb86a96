import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.cache import extract, residual_hooks
from probes.models import load_model
from steering.hooks import ablate, add
from steering.orthogonalize import orthogonalize, save_checkpoint
from tests.numerics import FLOAT32_REL, FLOAT64_REL, assert_rel_close, rel_err

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon"]


def logits(model, prompts=PROMPTS):
    enc = model.tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        return model.hf_model(**enc).logits


def a_direction(model, seed=0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


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
    before = logits(embedded)
    with add(embedded, r, layer=5, coeff=0.0):
        assert torch.equal(logits(embedded), before)
    with add(embedded, r, layer=5, coeff=8.0):
        assert (logits(embedded) - before).abs().max() > 1e-2
    with pytest.raises(RuntimeError):
        with ablate(embedded, r):
            raise RuntimeError("boom")
    assert torch.equal(logits(embedded), before)


def test_interventions_act_during_generate(embedded):
    enc = embedded.tokenizer([embedded.format_chat("Name a colour.")], return_tensors="pt").to(embedded.device)
    plain = embedded.hf_model.generate(**enc, max_new_tokens=6, do_sample=False)
    with add(embedded, a_direction(embedded) * 50, layer=3):
        steered = embedded.hf_model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, steered)



def test_side_by_side_has_a_column_per_edit_and_leaves_no_hook(tiny):
    from steering.generation import generate, side_by_side

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


def test_orthogonalized_weights_equal_hook_ablation_and_checkpoint_reloads(tmp_path, device):
    # float64: the weight edit is an identity, so it must hold to float64 rounding (float32 would leave ~1e-5 of
    # rounding noise over 30 layers and hide nothing useful; a missed writer or bias shows at 1e-3 or more)
    model = load_model("embedded", device=device, dtype="float64")  # a fresh copy: the weights are edited in place
    r = a_direction(model, seed=3)
    plain = logits(model)
    with ablate(model, r):
        hooked = logits(model)
    assert rel_err(plain, hooked) > 1e-3  # the direction matters
    assert model.hf_model.config.tie_word_embeddings
    orthogonalize(model, r)
    edited = logits(model)
    assert_rel_close(edited, hooked, FLOAT64_REL)
    assert not model.hf_model.config.tie_word_embeddings
    assert model.hf_model.get_output_embeddings().weight is not model.hf_model.get_input_embeddings().weight
    ids = model.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        bridge_logits = model.bridge(ids)
    # the bridge sees the edit too (its own forward keeps some float32 steps: ~2e-7; unedited it is off by >1e-3)
    assert_rel_close(bridge_logits[0], edited[0, : ids.shape[1]], FLOAT32_REL)
    path = save_checkpoint(model, tmp_path / "ckpt", r, layer=10, position=-1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(model.device)
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        assert_rel_close(reloaded(**enc).logits, edited, FLOAT64_REL)
    assert (path / "direction.safetensors").is_file() and "layer 10" in (path / "README.md").read_text()
    with pytest.raises(FileExistsError):
        save_checkpoint(model, path, r, layer=10, position=-1)
