"""Weight orthogonalization: the edit equals the hook ablation (embedded model, biases), the checkpoint reloads and
is written atomically."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from probes.forward import chat_token_ids, last_token_logits, pad_id, pad_token_ids
from probes.models import load_model
from probes.random_models import build_random_model
from steering.hooks import ablate
from steering.orthogonalize import orthogonalize, save_checkpoint
from tests.helpers import padded_logits
from tests.numerics import FLOAT32_REL, FLOAT64_REL, assert_rel_close, rel_err

PROMPTS = ["How do I bake bread?", "Name three rivers"]
EMBEDDED_PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon"]


def test_orthogonalized_weights_equal_hook_ablation_and_checkpoint_reloads(tmp_path, device):
    # float64: the weight edit is an identity, so it must hold to float64 rounding (float32 would leave ~1e-5 of
    # rounding noise over 30 layers and hide nothing useful; a missed writer or bias shows at 1e-3 or more)
    model = load_model("embedded", device=device, dtype="float64")  # a fresh copy: the weights are edited in place
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    plain = padded_logits(model, EMBEDDED_PROMPTS)
    with ablate(model, r):
        hooked = padded_logits(model, EMBEDDED_PROMPTS)
    assert rel_err(plain, hooked) > 1e-3  # the direction matters
    assert model.hf_model.config.tie_word_embeddings
    orthogonalize(model, r)
    edited = padded_logits(model, EMBEDDED_PROMPTS)
    assert_rel_close(edited, hooked, FLOAT64_REL)
    assert not model.hf_model.config.tie_word_embeddings
    assert model.hf_model.get_output_embeddings().weight is not model.hf_model.get_input_embeddings().weight
    ids = model.tokenizer(EMBEDDED_PROMPTS[:1], return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        bridge_logits = model.bridge(ids)
    # the bridge sees the edit too (its own forward keeps some float32 steps: ~2e-7; unedited it is off by >1e-3)
    assert_rel_close(bridge_logits[0], edited[0, : ids.shape[1]], FLOAT32_REL)
    path = save_checkpoint(model, tmp_path / "ckpt", r, layer=10, position=-1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(model.device)
    enc = model.tokenizer(EMBEDDED_PROMPTS, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        assert_rel_close(reloaded(**enc).logits, edited, FLOAT64_REL)
    assert (path / "direction.safetensors").is_file() and "layer 10" in (path / "README.md").read_text()
    with pytest.raises(FileExistsError):
        save_checkpoint(model, path, r, layer=10, position=-1)


def biased_model():
    """A tiny Llama whose attention and MLP projections have biases (as some architectures do)."""
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=True)
    model = build_random_model(config, device="cpu")
    with torch.no_grad():
        for name, p in model.hf_model.named_parameters():
            if name.endswith("bias"):
                p.normal_()  # random init leaves biases at zero: make them matter
    return model


def test_orthogonalization_handles_biases():
    model = biased_model()
    ids = chat_token_ids(model, PROMPTS)
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    with ablate(model, r):
        hooked = last_token_logits(model, ids)
    plain = last_token_logits(model, ids)
    assert (plain - hooked).abs().max() > 1e-3
    orthogonalize(model, r)
    assert_rel_close(last_token_logits(model, ids), hooked)
    unit = r / r.norm()
    for layer in model.hf_model.model.layers:
        for out in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert abs(float(out.bias.detach() @ unit)) < 1e-5
            assert (unit @ out.weight.detach()).abs().max() < 1e-5


def test_orthogonalize_refuses_batched_directions(tiny):
    with pytest.raises(ValueError, match="one direction"):
        orthogonalize(tiny, torch.randn(2, tiny.d_model))


def test_save_is_atomic_and_overwrite_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    model = load_model("random:llama-tiny", device="cpu")
    r = torch.randn(model.d_model)
    orthogonalize(model, r)
    path = save_checkpoint(model, tmp_path / "ckpt", r, layer=2, position=-1, source_model="tiny test model")
    meta = json.loads((path / "direction.json").read_text())
    assert meta == {"source_model": "tiny test model", "base_model": "random:llama-tiny", "layer": 2,
                    "position": -1, "untied_embeddings": True,
                    "orthogonalization": {"exact": True, "tensors_edited": 1 + 2 * model.n_layers, "post_norm": False},
                    # the one direction.json schema: what does not apply to a direction given as a tensor is empty
                    "weights": None, "selection": None, "excluded_dims": [], "n_positive": None, "n_negative": None,
                    "direction_file": None}
    assert "tiny test model" in (path / "README.md").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "other", r, layer=2, position=-1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, r, layer=3, position=-2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or half-written folder
    assert json.loads((path / "direction.json").read_text())["layer"] == 2  # the old checkpoint is intact
    monkeypatch.undo()
    save_checkpoint(model, path, r, layer=3, position=-2, overwrite=True)
    assert json.loads((path / "direction.json").read_text())["layer"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    ids = chat_token_ids(model, PROMPTS)
    with torch.inference_mode():
        input_ids, mask = pad_token_ids(ids, pad_id(model), "left", model.device)
        out = reloaded(input_ids=input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    assert_rel_close(out, last_token_logits(model, ids))
