"""Where a model's residual stream is written, read from the TransformerBridge's architecture adapter.

This is the one module that knows how Hugging Face models are laid out. Everything else (hooks, weight edits, LoRA
targets, activation capture, SAE placement) asks :func:`architecture` instead of naming modules such as
``self_attn`` or ``down_proj``.

The adapter's ``component_mapping`` names the Hugging Face module behind each TransformerLens component
(``embed``, ``pos_embed``, ``blocks`` with ``attn``/``mlp`` and their ``o``/``out`` projections), and the block's
hook aliases say which component's output is the one *added to the residual stream*: ``hook_attn_out`` is
``attn.hook_out`` on pre-norm blocks, ``ln1_post.hook_out`` on Gemma-2/3 and ``ln1.hook_out`` on OLMo-2, where the
attention output passes a post-norm first. Mixture-of-experts blocks keep their experts fused in 3-D tensors
(transformers' ``experts.down_proj`` [E, d_model, inter], or [E, inter, d_model] with ``is_transposed``), plus
optional shared experts.

Checkpoints on disk get the same layout without loading a weight (:func:`meta_architecture`,
:func:`stored_writers`), for editing them shard by shard.

An architecture whose layout cannot be read this way gets an :class:`UnsupportedArchitecture` error that names it
and says what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
from transformers.pytorch_utils import Conv1D

from probes.errors import WorkbenchError


class UnsupportedArchitecture(ValueError):
    """The workbench cannot locate the residual-stream writers of this architecture; the message says which part."""


@dataclass(frozen=True)
class OutputWeight:
    """A tensor whose output lies in the residual stream: ``axis`` is the d_model axis that is written.

    ``after_norm``: the tensor is added after the writer's norm (the norm's own bias), so it is orthogonalized
    against the direction itself rather than against the direction as the norm sees it."""

    name: str
    param: torch.nn.Parameter
    axis: int
    after_norm: bool = False


@dataclass(frozen=True)
class PostNorm:
    """The gain of a norm between a writer's weights and the residual stream: RMSNorm post-norms (Gemma-2/3,
    OLMo-2) and LayerNorms (BLOOM's embedding LayerNorm, which also subtracts the mean: ``centered``)."""

    weight: torch.nn.Parameter | None
    offset: float  # gain = offset + weight (Gemma stores w for a gain of 1 + w)
    centered: bool = False

    def gain(self) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.detach() + self.offset


@dataclass(frozen=True)
class Writer:
    """One module whose forward output is added to the residual stream, and the weights that produce it.

    ``module`` is what a forward hook must edit (the post-norm where there is one; BLOOM's attention and MLP add the
    residual themselves, so a hook there projects the whole stream, the same ablation); ``weights`` are the tensors to
    orthogonalize; ``post_norm`` is set when those weights feed a norm before the residual stream; ``approximate``
    says why no weight edit can reproduce the hook on this writer (e.g. XGLM's sinusoidal positions, a buffer).
    ``kind`` is "embed", "pos_embed", "attn", "mlp", or the block submodule of another sequence mixer
    ("linear_attn", "mixer", "mamba", "conv")."""

    kind: str
    layer: int | None
    path: str
    module: torch.nn.Module
    weights: tuple[OutputWeight, ...]
    post_norm: PostNorm | None = None
    approximate: str | None = None


# Families whose attention and MLP writer modules output exactly the bridge's hook_attn_out / hook_mlp_out
# (checked on random-weights models; tests/test_cache.py checks one of each kind of block). Elsewhere the output is
# scaled later (Granite's residual multiplier), shaped otherwise (Llama-4's flattened MoE output), summed with a
# parallel branch's bias (Cohere) or holds the residual (BLOOM), so those are read through the bridge.
COMPONENT_OUTPUTS_CHECKED = frozenset({
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
    "GPTJForCausalLM", "FalconForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM",
    "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM"})


@dataclass
class Architecture:
    """The residual-stream layout of one model: blocks, writers, LoRA targets."""

    name: str  # the Hugging Face class, e.g. "Gemma2ForCausalLM"
    blocks: torch.nn.ModuleList
    block_path: str
    writers: list[Writer]
    lora_targets: list[str]  # leaf module names of the attention and dense MLP projections

    def component_output(self, layer: int, kind: str) -> torch.nn.Module | None:
        """The one module whose forward output is block ``layer``'s ``kind`` ("attn" or "mlp") output as added to
        the residual stream (the bridge's ``hook_attn_out`` / ``hook_mlp_out``), or None where there is no single
        such module, or its output is not known to equal the hook (:data:`COMPONENT_OUTPUTS_CHECKED`)."""
        found = [w for w in self.writers if w.layer == layer and w.kind == kind]
        if len(found) != 1 or self.name not in COMPONENT_OUTPUTS_CHECKED:
            return None
        return found[0].module

    @property
    def post_norm(self) -> bool:
        """True when some writer's weights feed a norm before the stream (weight edits are then approximate)."""
        return any(w.post_norm is not None for w in self.writers)

    @property
    def exact_orthogonalization(self) -> bool:
        """Whether removing the direction from the weights reproduces the hook ablation exactly."""
        return not self.post_norm and not self.approximations

    @property
    def approximations(self) -> list[str]:
        """Why the weight edit differs from the hooks, one line per writer that makes it approximate."""
        out = [f"{w.path}: {w.approximate}" for w in self.writers if w.approximate]
        return out + [f"{w.path}: a {'LayerNorm' if w.post_norm.centered else 'RMSNorm'} between the weights and "
                      "the residual stream" for w in self.writers if w.post_norm is not None]


def _unsupported(arch: str, what: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"architecture {arch}: {what}. The workbench reads the residual-stream layout from the TransformerBridge "
        "adapter (probes/architecture.py); this family needs support added there.")


# Families whose residual stream no per-writer hook or weight edit can keep orthogonal to a direction, and why.
REFUSED = {
    "OpenAIGPTLMHeadModel": "GPT-1 is post-LN: each block's LayerNorm acts on the whole residual stream after the "
                            "sublayer is added, so its gain and bias put the direction back after any ablation",
    "DeepseekV4ForCausalLM": "its hyper-connections mix several residual streams with learned weights; the "
                             "workbench handles one residual stream",
    "HrmTextForCausalLM": "its two recurrent block stacks (H and L) have no single residual stream",
    "RecurrentGemmaForCausalLM": "its adapter maps no blocks the workbench can read (recurrent and attention "
                                 "layers mixed in one list)",
    "RwkvForCausalLM": "RWKV's time-mix output is rescaled and its first block normalises the embeddings "
                       "(ln0) where the adapter maps no writer",
    "Zamba2ForCausalLM": "its hybrid layers run one shared transformer block whose output enters the stream "
                         "through per-layer adapters the TransformerBridge adapter does not map",
    "JetMoeForCausalLM": "its attention is a mixture of experts (MoA) whose fused output experts the adapter does "
                         "not name",
}


def _refusal(hf_model: torch.nn.Module, arch: str) -> str | None:
    """Why ``hf_model``'s family is refused, from its class or its config (post-LN variants), or None."""
    cfg = getattr(hf_model, "config", None)
    if getattr(cfg, "do_layer_norm_before", True) is False:
        return ("do_layer_norm_before=False (post-LN, e.g. OPT-350m): each block's LayerNorm acts on the whole "
                "residual stream after the sublayer is added, so its gain and bias put the direction back")
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        return ("apply_residual_connection_post_layernorm=True: the residual is taken after the LayerNorm, which "
                "acts on the whole stream")
    return REFUSED.get(arch)


def _alias_bridge_names() -> None:
    """Register the transformers spelling of classes the bridge registers under another name (PhiMoE)."""
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,
        ArchitectureAdapterFactory,
    )

    for bridge_name, hf_name in BRIDGE_ALIASES.items():
        if bridge_name in SUPPORTED_ARCHITECTURES:
            SUPPORTED_ARCHITECTURES.setdefault(hf_name, SUPPORTED_ARCHITECTURES[bridge_name])
            if hf_name not in ArchitectureAdapterFactory._adapters:
                ArchitectureAdapterFactory.register_adapter(hf_name, SUPPORTED_ARCHITECTURES[bridge_name])


BRIDGE_ALIASES = {"PhiMoEForCausalLM": "PhimoeForCausalLM"}  # the bridge's name -> transformers' class name
_alias_bridge_names()


def _gated_delta_net_fallbacks() -> None:
    """The bridge's hooked gated DeltaNet (Qwen3-Next, Qwen3.5) reads ``causal_conv1d_fn`` and
    ``chunk_gated_delta_rule`` from the Hugging Face module, which transformers sets only when the ``kernels``
    package is installed: without it, give the module transformers' own torch path (no fused convolution, and
    ``torch_chunk_gated_delta_rule``) before the bridge runs it."""
    import sys

    from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge

    hooked = GatedDeltaNetBridge._hooked_forward

    def hooked_forward(self, *args, **kwargs):
        hf = self.original_component
        rule = getattr(sys.modules[type(hf).__module__], "torch_chunk_gated_delta_rule", None)
        if not hasattr(hf, "chunk_gated_delta_rule") and rule is not None:
            hf.causal_conv1d_fn, hf.chunk_gated_delta_rule = getattr(hf, "causal_conv1d_fn", None), rule
        return hooked(self, *args, **kwargs)

    GatedDeltaNetBridge._hooked_forward = hooked_forward


_gated_delta_net_fallbacks()


def _submodule(root: torch.nn.Module, path: str, arch: str, what: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise _unsupported(arch, f"the adapter names {what} {path!r}, which this model does not have") from err


def _linear_outputs(module: torch.nn.Module, prefix: str, d_model: int, arch: str) -> list[OutputWeight]:
    """Weight (and bias) of a projection into the residual stream: ``nn.Linear`` [out, in] or GPT-2 ``Conv1D``
    [in, out]."""
    if isinstance(module, Conv1D):
        axis = 1
    elif isinstance(module, torch.nn.Linear):
        axis = 0
    else:
        raise _unsupported(arch, f"{prefix} is a {type(module).__name__}, not a Linear or Conv1D projection")
    weight = module.weight
    if weight.shape[axis] != d_model:
        raise _unsupported(arch, f"{prefix} writes {weight.shape[axis]} features, not d_model={d_model}")
    out = [OutputWeight(f"{prefix}.weight", weight, axis)]
    if getattr(module, "bias", None) is not None:
        out.append(OutputWeight(f"{prefix}.bias", module.bias, 0))
    return out


def _fused_axis(sub: torch.nn.Module, param: torch.Tensor, d_model: int) -> int | None:
    """The d_model axis of fused expert weights [E, ., .], from the shape where only one axis has d_model, else
    from the module's layout: transformers' ``is_transposed`` ([E, inter, d]), Llama-4's ``expert_dim``
    ([E, expert_dim, hidden]), or transformers' default [E, d, inter]."""
    axes = [axis for axis in (1, 2) if param.shape[axis] == d_model]
    if len(axes) == 1:
        return axes[0]
    if not axes:
        return None
    if hasattr(sub, "is_transposed"):
        return 2 if sub.is_transposed else 1
    return 2 if hasattr(sub, "expert_dim") else 1


EXPERT_OUT = ("down_proj", "w2", "fc2", "c_proj", "wo")  # an expert's output projection, by its usual names


def _expert_outputs(module: torch.nn.Module, prefix: str, d_model: int, arch: str) -> list[OutputWeight]:
    """Output tensors of every expert in a MoE block: fused routed experts (``down_proj`` [E, d, inter],
    [E, inter, d] or Llama-4's [E, expert_dim, hidden], with ``down_proj_bias`` [E, d]), and experts stored one
    module each (``experts.3.down_proj``) or shared (``shared_experts.down_proj``), found by their names."""
    out = []
    for name, sub in module.named_modules(prefix=prefix):
        param = getattr(sub, "down_proj", None)
        if isinstance(param, torch.nn.Parameter) and param.dim() == 3:
            axis = _fused_axis(sub, param, d_model)
            if axis is None:
                raise _unsupported(arch, f"fused experts {name}.down_proj have shape {tuple(param.shape)}, with no "
                                         f"d_model={d_model} axis")
            out.append(OutputWeight(f"{name}.down_proj", param, axis))
            bias = getattr(sub, "down_proj_bias", None)
            if isinstance(bias, torch.nn.Parameter):
                out.append(OutputWeight(f"{name}.down_proj_bias", bias, 1))
        elif isinstance(sub, (torch.nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in EXPERT_OUT:
            out += _linear_outputs(sub, name, d_model, arch)
    return out


def _is_moe(component) -> bool:
    subs = getattr(component, "submodules", {}) or {}
    return "MoE" in type(component).__name__ or any("MoE" in type(s).__name__ for s in subs.values())


def _component_outputs(hf_root, component, path: str, d_model: int, arch: str) -> list[OutputWeight]:
    """Output weights of a bridge component (attention, MLP, MoE or another mixer) whose HF module sits at
    ``path``, read for this layer: a MoE family's dense layers (DeepSeek's first_k_dense_replace, Llama-4's
    interleaved layers) have the dense projection and no experts."""
    subs = getattr(component, "submodules", {}) or {}
    out: list[OutputWeight] = []
    for role in ("o", "out", "out_proj", "dense_out"):
        if role in subs:
            proj_path = f"{path}.{subs[role].name}"
            try:
                proj = hf_root.get_submodule(proj_path)
            except AttributeError:
                if getattr(subs[role], "optional", False):
                    continue  # e.g. the dense MLP of a MoE family, absent from sparse layers
                raise _unsupported(arch, f"the adapter names {proj_path!r}, which this model does not have") from None
            out += _linear_outputs(proj, proj_path, d_model, arch)
    if _is_moe(component):
        known = {w.name for w in out}
        experts = [w for w in _expert_outputs(_submodule(hf_root, path, arch, "the MoE block"), path, d_model, arch)
                   if w.name not in known]
        if not experts and not out:
            raise _unsupported(arch, f"the mixture-of-experts block {path} has neither experts the workbench can "
                                     "read nor a dense output projection")
        out += experts
    if not out:  # a mixer the adapter maps without naming its output (Qwen3-Next's gated DeltaNet)
        module = _submodule(hf_root, path, arch, "the mixer")
        name = next((n for n in MIXER_OUT if isinstance(getattr(module, n, None), torch.nn.Linear)), None)
        if name is not None:
            out = _linear_outputs(getattr(module, name), f"{path}.{name}", d_model, arch)
    return out


MIXER_OUT = ("out_proj", "o_proj", "down_proj")  # the output projection of a mixer the adapter maps without one


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        return isinstance(root.get_submodule(path), torch.nn.Module)
    except AttributeError:
        return False


def _norm(norm_module: torch.nn.Module, cfg, arch: str, path: str) -> tuple[PostNorm, list[OutputWeight]]:
    """The gain of a norm between weights and the residual stream, and its bias (added after it)."""
    kind = type(norm_module).__name__
    if "RMS" not in kind and not isinstance(norm_module, torch.nn.LayerNorm):
        raise _unsupported(arch, f"the norm {path} in front of the residual stream is a {kind}; only RMSNorm and "
                                 "LayerNorm can be orthogonalized")
    centered = isinstance(norm_module, torch.nn.LayerNorm)
    bias = getattr(norm_module, "bias", None)
    after = [OutputWeight(f"{path}.bias", bias, 0, after_norm=True)] if isinstance(bias, torch.nn.Parameter) else []
    offset = 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) and not centered else 0.0
    return PostNorm(getattr(norm_module, "weight", None), offset, centered), after


def _writer_component(block, role: str) -> str:
    """The block submodule whose output is added to the residual stream for ``role`` ("attn" or "mlp")."""
    aliases = getattr(block, "hook_aliases", {}) or {}
    target = aliases.get(f"hook_{role}_out")
    if isinstance(target, list):
        target = target[0]
    if target is None:  # Granite's scaled residual blocks: the sublayer output is scaled, then added
        return getattr(block, f"scaled_{role}_submodule", None) or role
    return target.split(".")[0]


def _is_norm(component) -> bool:
    return "Norm" in type(component).__name__ or "Rotary" in type(component).__name__


def _embedding_writers(hf_model: torch.nn.Module, mapping: dict, cfg, d_model: int, arch: str) -> list[Writer]:
    """The token embedding as it enters the stream (through OPT's ``project_in``, or BLOOM's embedding LayerNorm),
    and the position embeddings, mapped by the adapter or found beside the token embedding (XGLM's sinusoids)."""
    path = mapping["embed"].name
    module = _submodule(hf_model, path, arch, "the embed module")
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    weights = (OutputWeight(f"{path}.weight", module.weight, 1),)
    writers = [Writer("embed", None, path, module, weights)]
    project_in = getattr(hf_model.get_submodule(parent), "project_in", None)
    if isinstance(project_in, torch.nn.Linear):  # OPT with word_embed_proj_dim != hidden_size
        proj_path = f"{parent}.project_in"
        writers = [Writer("embed", None, proj_path, project_in,
                          tuple(_linear_outputs(project_in, proj_path, d_model, arch)))]
    elif "embed_ln" in mapping:  # BLOOM, ModernBERT: the embeddings pass a norm before the first block
        ln_path = mapping["embed_ln"].name
        ln = _submodule(hf_model, ln_path, arch, "the embedding norm")
        norm, bias = _norm(ln, cfg, arch, ln_path)
        writers = [Writer("embed", None, ln_path, ln, (*weights, *bias), norm)]
    pos_path = mapping["pos_embed"].name if "pos_embed" in mapping else next(
        (f"{parent}.{n}" for n in ("embed_positions", "wpe") if _has_submodule(hf_model, f"{parent}.{n}")), None)
    if pos_path is not None:
        pos = _submodule(hf_model, pos_path, arch, "the pos_embed module")
        weight = getattr(pos, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            writers.append(Writer("pos_embed", None, pos_path, pos, (OutputWeight(f"{pos_path}.weight", weight, 1),)))
        else:
            writers.append(Writer("pos_embed", None, pos_path, pos, (), approximate="position embeddings computed, "
                                  "not stored (a buffer), so the weight edit leaves their component along r"))
    return writers


def _layer_writers(hf_model, block, layer: int, d_model: int, arch: str, cfg) -> list[Writer]:
    """Every module of block ``layer`` that writes to the residual stream, read from the layer's own modules:
    attention, linear attention, Mamba or short-convolution mixers, dense MLP or MoE."""
    base = f"{block.name}.{layer}"
    subs = block.submodules or {}
    writers = []
    for key, sub in subs.items():
        path = base if sub.name is None else f"{base}.{sub.name}"
        if _is_norm(sub) or (sub.name is not None and not _has_submodule(hf_model, path)):
            continue
        if sub.name is None and not all(_has_submodule(hf_model, f"{base}.{s.name}") for s in sub.submodules.values()):
            continue
        weights = _component_outputs(hf_model, sub, path, d_model, arch)
        if not weights:
            raise _unsupported(arch, f"no output projection found for {path} ({type(sub).__name__})")
        target = _writer_component(block, key) if key in ("attn", "mlp") else key
        if target not in subs:
            raise _unsupported(arch, f"its {key} output alias points at {target!r}, which the blocks do not map")
        if sub.name is None:  # OPT, XGLM: the MLP's projections sit on the block itself; the output one writes
            out_path = weights[0].name.rsplit(".", 1)[0]
            writers.append(Writer(key, layer, out_path, hf_model.get_submodule(out_path), tuple(weights)))
            continue
        mod_path = f"{base}.{subs[target].name}"
        module = _submodule(hf_model, mod_path, arch, f"the {key} output")
        post, bias = _norm(module, cfg, arch, mod_path) if target != key else (None, [])
        writers.append(Writer(key, layer, mod_path, module, (*weights, *bias), post))
    if not writers:
        raise _unsupported(arch, f"block {base} has no module the workbench recognises as writing to the residual "
                                 "stream")
    return writers


LORA_ROLES = ("q", "k", "v", "o", "qkv", "gate", "in", "out", "gate_up")


def _lora_targets(blocks: torch.nn.ModuleList, subs: dict) -> list[str]:
    """Leaf names of the attention and dense MLP projections that some block has (OPT's MLP sits on the block)."""
    names = set()
    for role in ("attn", "mlp"):
        if role not in subs:
            continue
        prefix = "" if subs[role].name is None else f"{subs[role].name}."
        for key, sub in (subs[role].submodules or {}).items():
            if key in LORA_ROLES and type(sub).__name__ == "LinearBridge" \
                    and any(_has_submodule(b, prefix + sub.name) for b in blocks):
                names.add(sub.name)
    return sorted(names)


def architecture(bridge, hf_model: torch.nn.Module, d_model: int) -> Architecture:
    """Read the residual-stream layout of ``hf_model`` from ``bridge``'s architecture adapter."""
    arch = type(hf_model).__name__
    refusal = _refusal(hf_model, arch)
    if refusal is not None:
        raise _unsupported(arch, refusal)
    adapter = getattr(bridge, "adapter", None)
    mapping = getattr(adapter, "component_mapping", None) or {}
    cfg = getattr(bridge, "cfg", None)
    if "blocks" not in mapping or "embed" not in mapping:
        raise _unsupported(arch, "its adapter maps no 'blocks' or no 'embed' component")
    block = mapping["blocks"]
    blocks = _submodule(hf_model, block.name, arch, "the decoder blocks")
    if not isinstance(blocks, torch.nn.ModuleList):
        raise _unsupported(arch, f"{block.name} is not a list of blocks")
    writers = _embedding_writers(hf_model, mapping, cfg, d_model, arch)
    for layer in range(len(blocks)):
        writers += _layer_writers(hf_model, block, layer, d_model, arch, cfg)
    return Architecture(arch, blocks, block.name, writers, _lora_targets(blocks, block.submodules or {}))


# ----------------------------------------------------------------------------------------------- MLP readers
MLP_NEURON_ROLES = ("in", "gate", "out")  # the adapter's roles of a dense MLP's projections


def _block_component(bridge, role: str):
    """The adapter's mapping of the decoder blocks and of their submodule ``role`` ("mlp", "attn"); either is None
    where the adapter maps none."""
    block = (getattr(getattr(bridge, "adapter", None), "component_mapping", None) or {}).get("blocks")
    return block, (getattr(block, "submodules", None) or {}).get(role)


def _neuron_rows(module: torch.nn.Module, name: str, arch: str, output: bool) -> torch.Tensor:
    """A dense projection's weights as one row per neuron [n_neurons, d_model]: input projections are read by
    neuron rows, the output projection by its columns (``nn.Linear`` [out, in]; GPT-2 ``Conv1D`` [in, out])."""
    if isinstance(module, Conv1D):
        weight = module.weight.detach() if output else module.weight.detach().T
    elif isinstance(module, torch.nn.Linear):
        weight = module.weight.detach().T if output else module.weight.detach()
    else:
        raise _unsupported(arch, f"{name} is a {type(module).__name__}, not a Linear or Conv1D projection")
    return weight


def mlp_neuron_weights(bridge, hf_model: torch.nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """The dense MLP of block ``layer``, one row per neuron: ``"out"`` (its column of the down projection: what
    it writes to the residual stream), ``"in"`` (its row of the up projection) and, where gated, ``"gate"``; each
    [n_neurons, d_model], read from the bridge's adapter. A mixture of experts has no single neurons: refused."""
    arch = type(hf_model).__name__
    block, mlp = _block_component(bridge, "mlp")
    if mlp is None or _is_moe(mlp):
        raise _unsupported(arch, "neurons by their weights need a dense MLP in each block")
    base = f"{block.name}.{layer}" + ("" if mlp.name is None else f".{mlp.name}")
    subs, out = dict(mlp.submodules or {}), {}
    if "JointGateUp" in type(mlp).__name__:  # Phi-3: one fused [gate; up] projection the bridge splits
        path = f"{base}.gate_up_proj"
        fused = _neuron_rows(_submodule(hf_model, path, arch, "the fused MLP projection"), path, arch, False)
        out["gate"], out["in"] = fused.chunk(2, dim=0)
        subs = {role: sub for role, sub in subs.items() if role == "out"}
    for role, sub in subs.items():
        if role in MLP_NEURON_ROLES:
            path = f"{base}.{sub.name}"
            module = _submodule(hf_model, path, arch, "the MLP projection")
            out[role] = _neuron_rows(module, path, arch, role == "out")
    if "in" not in out or "out" not in out:
        raise _unsupported(arch, f"its MLP {base} maps no input or no output projection ({sorted(subs)})")
    return out


# Dense families whose MLP output projection's input equals the bridge's ``mlp.hook_post`` (checked on
# random-weights models in tests/test_cache.py): there the neurons are read from the plain model.
NEURON_INPUTS_CHECKED = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel",
                                   "GPTNeoXForCausalLM", "Gemma2ForCausalLM"})


def mlp_neuron_input(bridge, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module | None:
    """The module whose forward input is block ``layer``'s MLP neurons (the bridge's ``mlp.hook_post``: the down
    projection), or None where that is not known to hold (:data:`NEURON_INPUTS_CHECKED`)."""
    arch = type(hf_model).__name__
    block, mlp = _block_component(bridge, "mlp")
    out = (getattr(mlp, "submodules", None) or {}).get("out")
    if arch not in NEURON_INPUTS_CHECKED or mlp is None or out is None or _is_moe(mlp):
        return None
    path = f"{block.name}.{layer}" + ("" if mlp.name is None else f".{mlp.name}") + f".{out.name}"
    return _submodule(hf_model, path, arch, "the MLP output projection")


def attention_output_projection(bridge, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Block ``layer``'s attention output projection: its forward input [batch, seq, n_heads * d_head] holds every
    head's output laid out as the bridge's ``attn.hook_z`` (head h: features h * d_head .. (h + 1) * d_head), so a
    forward pre-hook on it reads or replaces single heads (activation patching)."""
    arch = type(hf_model).__name__
    block, attn = _block_component(bridge, "attn")
    subs = getattr(attn, "submodules", None) or {}
    role = next((r for r in ("o", "out", "out_proj") if r in subs), None)
    if attn is None or attn.name is None or role is None:
        raise _unsupported(arch, "per-head outputs need an attention with a mapped output projection")
    path = f"{block.name}.{layer}.{attn.name}.{subs[role].name}"
    return _submodule(hf_model, path, arch, "the attention output projection")


def attention_head_outputs(bridge, hf_model: torch.nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block ``layer``'s attention output projection split by head: [n_heads, d_head, d_model] (head h's slice of
    the projection's input, laid out as the bridge's ``attn.hook_z``) and its bias [d_model] or None, read from the
    adapter; what passes any post-norm is the caller's business (:attr:`Writer.post_norm`)."""
    module = attention_output_projection(bridge, hf_model, layer)
    weight = _neuron_rows(module, f"block {layer}'s attention output projection", type(hf_model).__name__, True)
    bias = getattr(module, "bias", None)  # weight: [n_heads * d_head, d_model]
    return weight.reshape(bridge.cfg.n_heads, -1, weight.shape[-1]), None if bias is None else bias.detach()


def final_norm_and_unembedding(bridge, hf_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The final norm after the last block (the adapter's ``ln_final``) and the unembedding (Hugging Face's
    ``get_output_embeddings()``, else the adapter's ``unembed``): early-exit logits of a hidden state ``h`` are
    ``unembedding(norm(h))``. Whatever the model's forward does to its logits after the unembedding (Granite's
    ``logits_scaling``, Cohere's ``logit_scale``, Gemma-2's final soft-capping) is not in these modules."""
    arch = type(hf_model).__name__
    mapping = getattr(getattr(bridge, "adapter", None), "component_mapping", None) or {}
    if "ln_final" not in mapping:
        raise _unsupported(arch, "its adapter maps no final norm ('ln_final') in front of the unembedding")
    norm = _submodule(hf_model, mapping["ln_final"].name, arch, "the final norm")
    unembed = hf_model.get_output_embeddings()
    if unembed is None and "unembed" in mapping:
        unembed = _submodule(hf_model, mapping["unembed"].name, arch, "the unembedding")
    if unembed is None:
        raise _unsupported(arch, "it has no output embeddings (get_output_embeddings() is None) and its adapter "
                                 "maps no 'unembed'")
    d_model = hf_model.config.get_text_config().hidden_size
    if getattr(unembed, "in_features", d_model) != d_model:
        raise _unsupported(arch, f"its unembedding reads {unembed.in_features} features, not d_model={d_model} "
                                 "(a projection such as OPT's project_out sits in front of it)")
    return norm, unembed


# ------------------------------------------------------------------------------------------ calling conventions
# Hugging Face decoder blocks take the hidden states as their first argument or as ``hidden_states=``, and blocks
# and sublayers return them alone or first in a tuple (with attention weights, router logits, caches).

Rewrite = Callable[[torch.Tensor], "torch.Tensor | None"]


def map_output(output, fn: Rewrite):
    """``fn`` applied to a module's output tensor (alone or first of a tuple), as a forward hook returns it: the
    output with that tensor replaced, or None (output unchanged) when ``fn`` returns None."""
    new = fn(output[0] if isinstance(output, tuple) else output)
    if new is None:
        return None
    return (new, *output[1:]) if isinstance(output, tuple) else new


def on_residual(block: torch.nn.Module, kind: str, fn: Rewrite) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(hidden)`` on the residual stream entering (``kind="pre"``) or leaving (``"post"``) a decoder block
    in every forward pass; a tensor it returns replaces the hidden states. Remove the returned handle to stop."""
    if kind == "post":
        return block.register_forward_hook(lambda module, args, output: map_output(output, fn))

    def pre(module, args, kwargs):
        new = fn(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    return block.register_forward_pre_hook(pre, with_kwargs=True)


# ------------------------------------------------------------------------------------------ checkpoints on disk
# A checkpoint too large for memory is edited one safetensors file at a time: its layout is read from a
# model built on the meta device (no weights), and its keys are mapped to that model's parameters the way
# ``from_pretrained`` maps them (transformers' conversion mapping: renamed keys, per-expert tensors that load into
# fused experts).


@dataclass(frozen=True)
class StoredWriter:
    """A checkpoint tensor that writes to the residual stream: the model parameter it loads into, its d_model
    ``axis`` as stored, and the checkpoint key and offset of the post-norm gain in front of it (``gain_key`` None: no
    post-norm, or one without a weight)."""

    key: str
    param: str
    axis: int
    gain_key: str | None = None
    gain_offset: float = 0.0
    centered: bool = False  # the norm is a LayerNorm: the gained direction is centred (see PostNorm)


def meta_architecture(config) -> tuple[Architecture, torch.nn.Module]:
    """The layout of the model ``config`` describes, and that model built on the meta device (no memory).

    The adapter is the one the bridge would choose; it is read without booting a bridge, which cannot be built on
    meta weights for every family (GPT-2's fused QKV is split at boot)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources import build_bridge_config_from_hf
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name = type(model).__name__
    try:
        bridge_config = build_bridge_config_from_hf(config, name, name, torch.float32)
        adapter = ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise _unsupported(name, f"TransformerLens has no adapter for it ({err})") from err
    bridge = SimpleNamespace(adapter=adapter, cfg=adapter.cfg)  # all architecture() reads of a bridge
    return architecture(bridge, model, config.get_text_config().hidden_size), model


def _stored_axis(axis: int, operations, key: str, arch: str) -> int:
    """The d_model axis of a checkpoint tensor that ``operations`` (transformers' conversion ops, applied in order
    when loading) turn into a parameter whose d_model axis is ``axis``."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    for op in reversed(operations):
        if isinstance(op, MergeModulelist) and op.dim != axis:  # one of the tensors stacked along op.dim
            axis -= axis > op.dim
        elif isinstance(op, Concatenate) and op.dim != axis:  # one of the blocks joined along another axis
            continue
        elif isinstance(op, Transpose) and not op.check_dims:
            axis = {op.dim0: op.dim1, op.dim1: op.dim0}.get(axis, axis)
        else:
            raise _unsupported(arch, f"checkpoint tensor {key} is loaded through {type(op).__name__}, whose d_model "
                                     "axis the workbench cannot trace")
    return axis


def _checkpoint_keys(model: torch.nn.Module, keys) -> dict[str, list[tuple[str, list]]]:
    """Parameter name -> the checkpoint keys that load into it, each with the conversion ops applied on the way."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    operations = {p: c.operations for c in converters for p in c.source_patterns}
    meta_state = model.state_dict()
    out: dict[str, list[tuple[str, list]]] = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if name not in meta_state and key in meta_state:  # as from_pretrained: renamed away from a real name
            name, pattern = key, None
        out.setdefault(name, []).append((key, operations.get(pattern, [])))
    return out


def stored_writers(arch: Architecture, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
                   ) -> list[StoredWriter]:
    """The tensors of a checkpoint (``shapes``: key -> shape, read from the safetensors headers) that write to the
    residual stream of ``model`` (built by :func:`meta_architecture`), with their stored d_model axis."""
    d_model = model.config.get_text_config().hidden_size
    stored = _checkpoint_keys(model, shapes)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for writer in arch.writers:
        gain_key, offset, centered = None, 0.0, writer.post_norm is not None and writer.post_norm.centered
        if writer.post_norm is not None and writer.post_norm.weight is not None:
            sources = stored.get(names[id(writer.post_norm.weight)], [])
            if len(sources) != 1 or sources[0][1]:
                raise _unsupported(arch.name, f"the checkpoint has no single tensor for the post-norm gain "
                                              f"{names[id(writer.post_norm.weight)]}")
            gain_key, offset = sources[0][0], writer.post_norm.offset
        for weight in writer.weights:
            if weight.name not in stored:
                raise WorkbenchError(f"the checkpoint has no tensor for {weight.name}, which writes to the residual "
                                     "stream: is a shard missing or the config of another model?")
            for key, operations in stored[weight.name]:
                axis = _stored_axis(weight.axis, operations, key, arch.name)
                if axis >= len(shapes[key]) or shapes[key][axis] != d_model:
                    raise _unsupported(arch.name, f"checkpoint tensor {key} has shape {tuple(shapes[key])}, with no "
                                                  f"d_model={d_model} axis where {weight.name} has it")
                out.append(StoredWriter(key, weight.name, axis, None, 0.0, False) if weight.after_norm
                           else StoredWriter(key, weight.name, axis, gain_key, offset, centered))
    return out
