"""Weight orthogonalization beyond the embedded model: biases, and atomic checkpoint writing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from probes.models import build_random_model, load_model
from steering.generation import chat_token_ids, last_token_logits, left_pad
from steering.hooks import ablate
from steering.orthogonalize import orthogonalize, save_checkpoint
from tests.numerics import assert_rel_close

PROMPTS = ["How do I bake bread?", "Name three rivers"]


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
                    "orthogonalization": {"exact": True, "tensors_edited": 1 + 2 * model.n_layers, "post_norm": False}}
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
        input_ids, mask = left_pad(model, ids)
        out = reloaded(input_ids=input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    assert_rel_close(out, last_token_logits(model, ids))
