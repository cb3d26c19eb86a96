import pytest
import torch

from probes.models import ModelLoadError, builtin_names, load_model
from probes.provenance import weights_fingerprint
from probes.random_models import random_twin


def test_embedded_metadata(embedded):
    assert (embedded.n_layers, embedded.d_model) == (30, 576)
    assert embedded.name == "embedded"
    assert embedded.dtype == torch.float32 and embedded.device.type in ("cpu", "cuda")
    assert "blocks.29.hook_resid_post" in embedded.hook_names()


def test_bridge_shares_weights_with_hf_model(embedded):
    bridged = embedded.bridge.original_model
    assert bridged.model.embed_tokens.weight is embedded.hf_model.model.embed_tokens.weight
    # SmolLM2 ties input and output embeddings: the tie must survive the wrapping
    assert embedded.hf_model.lm_head.weight is embedded.hf_model.model.embed_tokens.weight


def test_bridge_hooks_agree_with_hf_hidden_states(embedded):
    ids = embedded.tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"].to(embedded.device)
    with torch.inference_mode():
        _, cache = embedded.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
        hidden = embedded.hf_model(ids, output_hidden_states=True).hidden_states
    for layer in range(embedded.n_layers):
        ref = hidden[layer]
        rel = (cache[f"blocks.{layer}.hook_resid_pre"] - ref).abs().max() / ref.abs().max()
        assert rel < 1e-5, layer


def test_chat_template_post_instruction_positions(embedded):
    text = embedded.format_chat("Tell me a joke")
    assert text.rstrip().endswith("assistant")
    positions = embedded.post_instruction_positions()
    assert positions[-1] == -1 and all(b - a == 1 for a, b in zip(positions, positions[1:], strict=False))
    suffix_ids = embedded.tokenizer(text)["input_ids"][positions[0]:]
    assert "Tell me a joke" not in embedded.tokenizer.decode(suffix_ids)
    assert "assistant" in embedded.tokenizer.decode(suffix_ids)


def test_random_model_is_seeded(tiny):
    again = load_model("random:llama-tiny", device=tiny.device)
    assert tiny.n_layers == 4 and tiny.d_model == 64
    assert torch.equal(tiny.hf_model.model.layers[0].mlp.up_proj.weight,
                       again.hf_model.model.layers[0].mlp.up_proj.weight)
    other = load_model("random:llama-tiny", device=tiny.device, seed=1)
    assert not torch.equal(tiny.hf_model.model.layers[0].mlp.up_proj.weight,
                           other.hf_model.model.layers[0].mlp.up_proj.weight)


def test_random_twin_has_the_config_and_tokenizer_but_other_weights(embedded, tiny):
    twin = random_twin(embedded)
    assert twin.hf_model.config.to_dict() == embedded.hf_model.config.to_dict()
    assert twin.tokenizer is embedded.tokenizer and (twin.device, twin.dtype) == (embedded.device, embedded.dtype)
    assert (twin.n_layers, twin.d_model) == (embedded.n_layers, embedded.d_model)
    assert weights_fingerprint(twin) != weights_fingerprint(embedded)
    assert weights_fingerprint(random_twin(tiny, seed=3)) == weights_fingerprint(random_twin(tiny, seed=3))
    assert weights_fingerprint(random_twin(tiny, seed=3)) != weights_fingerprint(random_twin(tiny, seed=4))


@pytest.mark.parametrize("name", ["", "random:nope", "no-such-org/no-such-model-xyz"])
def test_unknown_names_explain_what_exists(name):
    with pytest.raises(ModelLoadError) as err:
        load_model(name, device="cpu")
    assert "embedded" in str(err.value) or "llama-tiny" in str(err.value)


def test_builtin_names_listed():
    assert "embedded" in builtin_names() and "random:llama-1b" in builtin_names()
