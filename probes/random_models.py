"""Models with seeded random weights, for tests, speed benchmarks and controls on machines with no network.

``load_model("random:<preset>")`` builds them (see :data:`RANDOM_PRESETS` and :data:`RANDOM_FAMILIES`); every one uses
the embedded tokenizer and its chat template. :func:`random_twin` gives any loaded model a random-weights twin.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from probes.models import ModelHandle, ModelLoadError, _resolve, embedded_checkpoint, wrap

RANDOM_PRESETS: dict[str, dict] = {
    # Shapes of Llama-3.2-1B (16 layers, d_model 2048), with the embedded tokenizer's vocabulary.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    # Shapes of Llama-3.1-8B (32 layers, d_model 4096; the embedded tokenizer's 49k vocabulary, not 128k).
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # A few layers of SmolLM2's width: fast enough for unit tests on a laptop CPU.
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}

# One tiny model per architecture family (``random:<family>``, the Hugging Face ``model_type``): 3 blocks of width
# 64, built from a config with seeded random weights, norm gains and biases randomised too (trained models never
# have all-ones norms or zero biases, and an edit that ignores them must not pass unnoticed).
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512)
RANDOM_FAMILIES: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2, head_dim=16),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "mistral": dict(num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_key_value_heads=2),
    "gemma2": dict(num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=16),
    "olmo2": dict(num_key_value_heads=2),
    "gpt2": dict(n_inner=128),
    "gpt_neox": dict(),
    "gptj": dict(rotary_dim=8, n_inner=128),
    "granite": dict(num_key_value_heads=2, residual_multiplier=0.5, embedding_multiplier=2.0,
                    attention_multiplier=0.3, logits_scaling=2.0),
    "cohere": dict(num_key_value_heads=2),
    "falcon": dict(num_kv_heads=1, parallel_attn=True, multi_query=True, bias=True),
    "mixtral": dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
    "qwen2_moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    # MoE families whose first layers are dense (first_k_dense_replace) or alternate dense and MoE (Llama-4)
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                        first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "glm4_moe": dict(num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                     topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32, n_shared_experts=1),
    "llama4_text": dict(num_key_value_heads=2, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
                        num_experts_per_tok=1, interleave_moe_layer_step=2),
    # hybrid blocks: gated DeltaNet, Mamba, Mamba-2 beside attention (Falcon-H1, in parallel), short convolution
    "qwen3_next": dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "jamba": dict(num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
                  use_mamba_kernels=False),
    # Falcon-H1: muP multipliers as its checkpoints have (the SSM ones powers of two: transformers computes them in
    # float32, and a float64 reload must give the same model)
    "falcon_h1": dict(num_key_value_heads=2, head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                      mamba_n_groups=1, mamba_d_state=8, mamba_rms_norm=True, embedding_multiplier=5.7,
                      attention_out_multiplier=0.9, ssm_out_multiplier=0.24, mlp_multipliers=[0.9, 0.6],
                      ssm_multipliers=[0.375, 0.25, 0.5, 0.375, 0.375], lm_head_multiplier=0.04),
    "lfm2": dict(num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"], block_auto_adjust_ff_dim=False),
    # OPT with project_in / project_out (word_embed_proj_dim != hidden_size), XGLM (sinusoidal positions, a buffer),
    # BLOOM (a LayerNorm on the embeddings before the first block)
    "opt": dict(ffn_dim=128, word_embed_proj_dim=32),
    "xglm": dict(ffn_dim=128),
    "bloom": dict(),
}


def random_names() -> list[str]:
    """Every ``random:<preset>`` name :func:`probes.models.load_model` understands."""
    return [f"random:{k}" for k in [*RANDOM_PRESETS, *RANDOM_FAMILIES]]


def random_layer_count(preset: str) -> int:
    """How many blocks ``random:<preset>`` has, known without building it."""
    if preset in RANDOM_PRESETS:
        return RANDOM_PRESETS[preset]["num_hidden_layers"]
    if preset in RANDOM_FAMILIES:
        return TINY_SHAPE["num_hidden_layers"]
    raise _unknown_random(preset)


def _unknown_random(preset: str) -> ModelLoadError:
    return ModelLoadError(f"unknown random model {preset!r}; choose one of "
                          f"{sorted([*RANDOM_PRESETS, *RANDOM_FAMILIES])}")


def random_config(family: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The tiny config of one architecture family (see :data:`RANDOM_FAMILIES`) for ``tokenizer``'s vocabulary."""
    if family not in RANDOM_FAMILIES:
        raise ModelLoadError(f"unknown architecture family {family!r}; choose one of {sorted(RANDOM_FAMILIES)}")
    return AutoConfig.for_model(family, **TINY_SHAPE, **RANDOM_FAMILIES[family], vocab_size=len(tokenizer),
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def _randomise_norms_and_biases(model: PreTrainedModel, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        scale = 0.3 if "norm" in type(owner).__name__.lower() else 0.1 if name.endswith("bias") else 0.0
        if scale:
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param))


def build_random_model(preset: str | PreTrainedConfig, device: str | torch.device | None = None,
                       dtype: torch.dtype | str | None = None, seed: int = 0) -> ModelHandle:
    """A model with seeded random weights and the embedded tokenizer (and its chat template): a Llama preset of
    :data:`RANDOM_PRESETS`, a tiny model of one architecture family of :data:`RANDOM_FAMILIES` (norm gains and
    biases randomised too), or any config."""
    device, dtype = _resolve(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint())
    randomise = False
    if isinstance(preset, str):
        if preset in RANDOM_PRESETS:
            config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **RANDOM_PRESETS[preset],
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        elif preset in RANDOM_FAMILIES:
            config, randomise = random_config(preset, tokenizer), True
        else:
            raise _unknown_random(preset)
        name = f"random:{preset}"
    else:
        config, name = preset, "random:custom"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if randomise:
        _randomise_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
    return wrap(name, model, tokenizer, source=name)


def random_twin(model: ModelHandle, seed: int = 0) -> ModelHandle:
    """``model``'s architecture, config and tokenizer with seeded random weights (the initialisation of
    ``from_config``), on its device in its dtype: the control for what a probe reads from the trained weights rather
    than from the tokens themselves. A hub or local model's config is the one ``AutoConfig`` read for its name."""
    config = copy.deepcopy(model.hf_model.config)
    torch.manual_seed(seed)
    with torch.device(model.device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    return wrap(f"random-weights:{model.name}", hf_model, model.tokenizer, source=model.source)
