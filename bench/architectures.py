"""Per-architecture check of the interventions, as a table: how orthogonal the residual stream is under ``ablate``
and under the weight edit, and how far the edited model is from the hooks.

    python -m bench.architectures [--families gemma2,gpt2]   # tiny random models of every family by default

Columns: max |x . r| / |x| over every layer and token (float32 hooks; float64 weight edit), the weight edit's logits
vs the hooks' (relative, float64 and float32) and the mean next-token KL(hooks || weights) (float64). The README's
architecture table is made from this output; tests/test_architectures.py asserts the same quantities.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from probes.architecture import BRIDGE_ALIASES, UnsupportedArchitecture, on_residual
from probes.models import ModelHandle, embedded_checkpoint, load_model, wrap
from probes.random_models import RANDOM_FAMILIES
from steering.hooks import ablate
from steering.orthogonalize import orthogonalize

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon", "Name three rivers in Europe"]
RANDOM_FLOAT32_ONLY = {"xglm"}  # transformers' XGLM attention fails in float64 (its mask value overflows)


def _states(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the residual stream after the embeddings and each block (before the final norm) at real tokens."""
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True).to(model.device)
    keep = enc["attention_mask"].bool()
    last = []
    handle = on_residual(model.architecture.blocks[-1], "post", last.append)
    try:
        with torch.inference_mode():
            out = model.hf_model(**enc, output_hidden_states=True)
    finally:
        handle.remove()
    resid = torch.stack([*out.hidden_states[:-1], last[0]])[:, keep]
    return out.logits[keep].double(), resid.double()


def _projection(resid: torch.Tensor, r: torch.Tensor) -> float:
    return float(((resid @ r).abs() / resid.norm(dim=-1)).max())


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def measure(family: str, seed: int = 0) -> dict:
    """The table's row for ``random:<family>``; float64 columns are NaN where the family runs only in float32."""
    r = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r /= r.norm()
    row = {"family": family, **{f"{k}_float64": float("nan") for k in ("ablate", "weights", "logits")}}
    for dtype in ("float32",) if family in RANDOM_FLOAT32_ONLY else ("float32", "float64"):
        model = load_model(f"random:{family}", device="cpu", dtype=dtype)
        with ablate(model, r):
            hooked, hooked_resid = _states(model)
        orthogonalize(model, r)
        edited, edited_resid = _states(model)
        rel = float((edited - hooked).abs().max() / hooked.abs().max())
        row[f"ablate_{dtype}"] = _projection(hooked_resid, r)
        row[f"weights_{dtype}"] = _projection(edited_resid, r)
        row[f"logits_{dtype}"] = rel
        row["kl"] = _kl(hooked, edited)
        row["class"] = model.architecture.name
        row["exact"] = model.architecture.exact_orthogonalization
        row["approximations"] = model.architecture.approximations
    return row


# ------------------------------------------------------------------------------ every architecture of the bridge
# A tiny config (2 blocks of width 64) for any causal LM class the TransformerBridge supports: these sizes where the
# config has the field, plus what a family needs to build that small (layer patterns naming both layer kinds).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, intermediate_size_mlp=128, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16)
TINY_OVERRIDES: dict[str, dict] = {
    "CodeGenForCausalLM": dict(rotary_dim=8), "GPTJForCausalLM": dict(rotary_dim=8),
    "GPTNeoForCausalLM": dict(attention_types=[[["global", "local"], 1]]),
    "Mamba2ForCausalLM": dict(num_heads=8, head_dim=16, n_groups=1),
    "Zamba2ForCausalLM": dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=16, n_mamba_heads=8),
    "JambaForCausalLM": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                             use_mamba_kernels=False),
    "Qwen3NextForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5ForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5MoeForCausalLM": dict(layer_types=["linear_attention", "full_attention"]),
    "BambaForCausalLM": dict(attn_layer_indices=[1]),
    "GraniteMoeHybridForCausalLM": dict(layer_types=["mamba", "attention"]),
    "Lfm2ForCausalLM": dict(layer_types=["conv", "full_attention"]),
    "Lfm2MoeForCausalLM": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "Llama4ForCausalLM": dict(interleave_moe_layer_step=2),
    "NemotronHForCausalLM": dict(hybrid_override_pattern="M*"),
}
NO_HEAD_DIM = {"FalconForCausalLM", "Gemma4ForCausalLM"}  # head_dim is derived there (a property)
FLOAT32_ONLY = {"XGLMForCausalLM"}  # transformers' XGLM attention fails in float64 (its mask value overflows)


def bridge_architectures() -> list[str]:
    """Every causal LM class in TransformerLens's supported list that transformers has (bridge aliases resolved),
    plus GPT-1, which the bridge lists as OpenAIGPTLMHeadModel."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    names = {BRIDGE_ALIASES.get(n, n) for n in SUPPORTED_ARCHITECTURES if n.endswith("ForCausalLM")}
    return sorted(n for n in names | {"OpenAIGPTLMHeadModel"} if hasattr(transformers, n))


def tiny_config(class_name: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """A 2-block, width-64 config of ``class_name`` for ``tokenizer``'s vocabulary."""
    config_class = getattr(transformers, class_name).config_class
    default = config_class()
    kwargs = {k: v for k, v in TINY.items() if hasattr(default, k)}
    if hasattr(default, "qk_rope_head_dim") or class_name in NO_HEAD_DIM:
        kwargs.pop("head_dim", None)  # MLA: head_dim is the rope part
    if hasattr(default, "qk_rope_head_dim"):
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # MLA has no grouped keys and values
    kwargs.update(TINY_OVERRIDES.get(class_name, {}))
    return config_class(**kwargs, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_model(class_name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> ModelHandle:
    """A tiny model of ``class_name`` with seeded random weights, norm gains and biases randomised too."""
    config = tiny_config(class_name, tokenizer)
    dtype = torch.float32 if class_name in FLOAT32_ONLY else torch.float64
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            scale = 0.3 if "norm" in type(owner).__name__.lower() else 0.1 if name.endswith("bias") else 0.0
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param))
    return wrap(f"tiny:{class_name}", model, tokenizer)


def check_family(class_name: str, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Wrap, ablate and orthogonalize a tiny model of ``class_name``: the residual stream's largest component along
    a random direction under the hooks and under the weight edit, the edit's logits against the hooks', and
    whether the workbench reports the edit exact; ``refused`` holds the reason of an UnsupportedArchitecture."""
    model = tiny_model(class_name, tokenizer)
    try:
        exact = model.architecture.exact_orthogonalization
    except UnsupportedArchitecture as err:
        return {"class": class_name, "refused": str(err)}
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r /= r.norm()
    with ablate(model, r):
        hooked, hooked_resid = _states(model)
    orthogonalize(model, r)
    edited, edited_resid = _states(model)
    return {"class": class_name, "refused": None, "exact": exact, "dtype": str(model.dtype),
            "ablate": _projection(hooked_resid, r), "weights": _projection(edited_resid, r),
            "logits": float((edited - hooked).abs().max() / hooked.abs().max()), "kl": _kl(hooked, edited),
            "approximations": model.architecture.approximations}


def _reasons(approximations: list[str]) -> str:
    """Why an edit is approximate, each reason once (without the module paths)."""
    return "; ".join(sorted({a.split(": ", 1)[-1] for a in approximations}))


def _status(row: dict) -> str:
    if "unbuilt" in row:
        return "not built"
    return "refused" if row["refused"] else "exact" if row["exact"] else "approximate"


def bridge_table(tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """:func:`check_family` on every architecture of :func:`bridge_architectures`, printed as a table with the
    counts of exact, approximate and refused families (those transformers cannot build offline are left out)."""
    rows = []
    for name in bridge_architectures():
        try:
            rows.append(check_family(name, tokenizer))
        except Exception as err:  # noqa: BLE001 - a tiny config this transformers cannot build: say so, go on
            rows.append({"class": name, "refused": None, "unbuilt": f"{type(err).__name__}: {err}"[:200]})
    print("| class | status | ablate | weights | logits vs hooks | KL hooks-weights | why |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        status = _status(r)
        numbers = ("| | | |" if status in ("not built", "refused") else
                   f"{r['ablate']:.1e} | {r['weights']:.1e} | {r['logits']:.1e} | {r['kl']:.1e} |")
        why = (r.get("unbuilt") or (r["refused"] or "").split(". The workbench reads")[0]
               or _reasons(r.get("approximations", [])))
        print(f"| {r['class']} | {status} | {numbers} {why} |")
    counts = {s: sum(_status(r) == s for r in rows) for s in ("exact", "approximate", "refused", "not built")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(RANDOM_FAMILIES), help="comma-separated random:<family> names")
    parser.add_argument("--bridge", action="store_true", help="every architecture of the TransformerBridge instead")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.bridge:
        return bridge_table(AutoTokenizer.from_pretrained(embedded_checkpoint()))
    rows = [measure(f) for f in args.families.split(",")]
    print("| family | class | ablate: max proj (f32) | weights: max proj (f64) "
          "| weights vs hooks, logits rel (f64 / f32) | KL hooks-weights (f64) | orthogonalize |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['family']} | {r['class']} | {r['ablate_float32']:.1e} | {r['weights_float64']:.1e} | "
              f"{r['logits_float64']:.1e} / {r['logits_float32']:.1e} | {r['kl']:.1e} | "
              f"{'exact' if r['exact'] else 'approximate: ' + _reasons(r['approximations'])} |")
    return rows


if __name__ == "__main__":
    main()
