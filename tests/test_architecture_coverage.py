"""Every architecture the TransformerBridge supports (its causal LMs that transformers has): a tiny random model of
each (2 blocks, width 64, norm gains and biases randomised) is either handled correctly, with the orthogonalization
reported exact only where it equals the hooks, or refused with an UnsupportedArchitecture naming the family and what
is missing. Never a raw error, never a silently wrong edit."""

import pytest
from transformers import AutoTokenizer

from bench.architectures import bridge_architectures, check_family
from probes.architecture import UnsupportedArchitecture
from probes.models import embedded_checkpoint

ARCHITECTURES = bridge_architectures()
# Refused, and why (the message must say so); every other family must be handled.
REFUSED = {"OpenAIGPTLMHeadModel": "post-LN", "DeepseekV4ForCausalLM": "hyper-connections",
           "HrmTextForCausalLM": "no single residual stream", "RecurrentGemmaForCausalLM": "no blocks",
           "RwkvForCausalLM": "ln0", "JetMoeForCausalLM": "mixture of experts", "Zamba2ForCausalLM": "shared",
           "OlmoHybridForCausalLM": "post_feedforward_layernorm"}
# Mamba-style blocks and NanoChat normalise in float32 inside a float64 model: orthogonal to float32 rounding.
FLOAT32_NORMS = {"MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM", "NanoChatForCausalLM"}


# Families whose tiny config transformers 5.24 cannot build offline, and why.
NOT_BUILDABLE = {"Gemma4ForCausalLM": "its config treats head_dim as a per-layer attribute and refuses the global "
                                      "sizes a tiny config sets (AmbiguousGlobalPerLayerAttributeError)"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_checkpoint())


def test_the_list_is_the_bridges_whole_list():
    assert len(ARCHITECTURES) >= 80 and "PhimoeForCausalLM" in ARCHITECTURES and "OpenAIGPTLMHeadModel" in ARCHITECTURES


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_bridge_architecture_is_handled_or_clearly_refused(name, tokenizer):
    if name in NOT_BUILDABLE:
        pytest.skip(NOT_BUILDABLE[name])
    row = check_family(name, tokenizer)
    if name in REFUSED:
        assert row["refused"] and name in row["refused"] and REFUSED[name] in row["refused"]
        return
    assert row["refused"] is None, row["refused"]
    float32 = row["dtype"] == "torch.float32" or name in FLOAT32_NORMS
    assert row["ablate"] < (1e-6 if float32 else 1e-12)  # the stream is orthogonal to r under the hooks
    # and under the weight edit (post-norms compute in float32), except where a writer is a buffer (XGLM's
    # sinusoidal positions), which no weight edit reaches: the edit is then reported approximate
    if not any("buffer" in reason for reason in row["approximations"]):
        assert row["weights"] < (1e-6 if float32 or not row["exact"] else 1e-12)
    if row["exact"]:
        assert row["logits"] < (1e-5 if row["dtype"] == "torch.float32" else 1e-10)
        assert not row["approximations"]
    else:
        assert row["approximations"] and row["kl"] > 0


def test_a_refusal_is_an_unsupported_architecture(tokenizer):
    from bench.architectures import tiny_model

    with pytest.raises(UnsupportedArchitecture, match="RwkvForCausalLM"):
        _ = tiny_model("RwkvForCausalLM", tokenizer).architecture
