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
    """A tensor whose output lies in the residual stream: ``axis`` is the d_model axis that is written."""

    name: str
    param: torch.nn.Parameter
    axis: int


@dataclass(frozen=True)
class PostNorm:
    """The gain of an RMSNorm between a sublayer's output projection and the residual stream (Gemma-2/3, OLMo-2)."""

    weight: torch.nn.Parameter | None
    offset: float  # gain = offset + weight (Gemma stores w for a gain of 1 + w)

    def gain(self) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.detach() + self.offset


@dataclass(frozen=True)
class Writer:
    """One module whose forward output is added to the residual stream, and the weights that produce it.

    ``module`` is what a forward hook must edit (the post-norm where there is one); ``weights`` are the tensors to
    orthogonalize; ``post_norm`` is set when those weights feed a norm before the residual stream.
    """

    kind: str  # "embed", "pos_embed", "attn" or "mlp"
    layer: int | None
    path: str
    module: torch.nn.Module
    weights: tuple[OutputWeight, ...]
    post_norm: PostNorm | None = None


@dataclass
class Architecture:
    """The residual-stream layout of one model: blocks, writers, LoRA targets."""

    name: str  # the Hugging Face class, e.g. "Gemma2ForCausalLM"
    blocks: torch.nn.ModuleList
    block_path: str
    writers: list[Writer]
    lora_targets: list[str]  # leaf module names of the attention and dense MLP projections

    @property
    def post_norm(self) -> bool:
        """True when some sublayer output passes a norm before it is added (weight edits are then approximate)."""
        return any(w.post_norm is not None for w in self.writers)

    @property
    def exact_orthogonalization(self) -> bool:
        """Whether removing the direction from the weights reproduces the hook ablation exactly."""
        return not self.post_norm


def _unsupported(arch: str, what: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"architecture {arch}: {what}. The workbench reads the residual-stream layout from the TransformerBridge "
        "adapter (probes/architecture.py); this family needs support added there.")


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


def _expert_outputs(module: torch.nn.Module, prefix: str, d_model: int, arch: str) -> list[OutputWeight]:
    """Output tensors of fused experts (transformers' layout): ``down_proj`` [E, d, inter] ([E, inter, d] if
    ``is_transposed``) and ``down_proj_bias`` [E, d]."""
    out = []
    for name, sub in module.named_modules(prefix=prefix):
        param = getattr(sub, "down_proj", None)
        if not isinstance(param, torch.nn.Parameter) or param.dim() != 3:
            continue
        axis = 2 if getattr(sub, "is_transposed", False) else 1
        if param.shape[axis] != d_model:
            raise _unsupported(arch, f"fused experts {name}.down_proj have shape {tuple(param.shape)}, with no "
                                     f"d_model={d_model} output axis where transformers puts it")
        out.append(OutputWeight(f"{name}.down_proj", param, axis))
        bias = getattr(sub, "down_proj_bias", None)
        if isinstance(bias, torch.nn.Parameter):
            out.append(OutputWeight(f"{name}.down_proj_bias", bias, 1))
    return out


def _component_outputs(hf_root, component, path: str, d_model: int, arch: str) -> list[OutputWeight]:
    """Output weights of a bridge component (attention, MLP or MoE) whose HF module sits at ``path``."""
    subs = getattr(component, "submodules", {}) or {}
    out: list[OutputWeight] = []
    for role in ("o", "out", "dense_out"):
        if role in subs:
            proj_path = f"{path}.{subs[role].name}"
            try:
                proj = hf_root.get_submodule(proj_path)
            except AttributeError:
                if getattr(subs[role], "optional", False):
                    continue  # e.g. the dense MLP of a MoE family, absent from sparse layers
                raise _unsupported(arch, f"the adapter names {proj_path!r}, which this model does not have")
            out += _linear_outputs(proj, proj_path, d_model, arch)
    if type(component).__name__.startswith("MoE") or any(type(s).__name__.startswith("MoE") for s in subs.values()):
        experts = _expert_outputs(_submodule(hf_root, path, arch, "the MoE block"), path, d_model, arch)
        if not experts:
            raise _unsupported(arch, f"the mixture-of-experts block {path} has no fused experts.down_proj tensor")
        out += experts
        for key, sub in subs.items():  # shared experts: MLPs of their own inside the MoE block
            if key != "experts" and getattr(sub, "submodules", None) and "out" in sub.submodules:
                out += _component_outputs(hf_root, sub, f"{path}.{sub.name}", d_model, arch)
    return out


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        return isinstance(root.get_submodule(path), torch.nn.Module)
    except AttributeError:
        return False


def _post_norm(norm_module: torch.nn.Module, cfg, arch: str, path: str) -> PostNorm:
    if "RMS" not in type(norm_module).__name__:
        raise _unsupported(arch, f"the post-norm {path} is a {type(norm_module).__name__}; only RMSNorm post-norms "
                                 "can be orthogonalized")
    weight = getattr(norm_module, "weight", None)
    return PostNorm(weight, 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0)


def _writer_component(block, role: str) -> str:
    """The block submodule whose output is added to the residual stream for ``role`` ("attn" or "mlp")."""
    aliases = getattr(block, "hook_aliases", {}) or {}
    target = aliases.get(f"hook_{role}_out")
    if isinstance(target, list):
        target = target[0]
    if target is None:  # Granite's scaled residual blocks: the sublayer output is scaled, then added
        return getattr(block, f"scaled_{role}_submodule", None) or role
    return target.split(".")[0]


def architecture(bridge, hf_model: torch.nn.Module, d_model: int) -> Architecture:
    """Read the residual-stream layout of ``hf_model`` from ``bridge``'s architecture adapter."""
    arch = type(hf_model).__name__
    adapter = getattr(bridge, "adapter", None)
    mapping = getattr(adapter, "component_mapping", None) or {}
    cfg = getattr(bridge, "cfg", None)
    if "blocks" not in mapping or "embed" not in mapping:
        raise _unsupported(arch, "its adapter maps no 'blocks' or no 'embed' component")
    block = mapping["blocks"]
    block_path = block.name
    blocks = _submodule(hf_model, block_path, arch, "the decoder blocks")
    if not isinstance(blocks, torch.nn.ModuleList):
        raise _unsupported(arch, f"{block_path} is not a list of blocks")
    writers = []
    for kind in ("embed", "pos_embed"):
        if kind in mapping:
            path = mapping[kind].name
            module = _submodule(hf_model, path, arch, f"the {kind} module")
            writers.append(Writer(kind, None, path, module, (OutputWeight(f"{path}.weight", module.weight, 1),)))
    subs = block.submodules or {}
    for role in ("attn", "mlp"):
        if role not in subs:
            raise _unsupported(arch, f"its blocks map no '{role}' component")
    lora = [sub.name for role in ("attn", "mlp") for key, sub in (subs[role].submodules or {}).items()
            if key in ("q", "k", "v", "o", "qkv", "gate", "in", "out", "gate_up") and len(blocks)
            and type(sub).__name__ == "LinearBridge" and _has_submodule(blocks[0], f"{subs[role].name}.{sub.name}")]
    for layer in range(len(blocks)):
        for role in ("attn", "mlp"):
            sub_path = f"{block_path}.{layer}.{subs[role].name}"
            weights = tuple(_component_outputs(hf_model, subs[role], sub_path, d_model, arch))
            if not weights:
                raise _unsupported(arch, f"no output projection found for {sub_path} (no 'o'/'out' in the adapter)")
            key = _writer_component(block, role)
            if key not in subs:
                raise _unsupported(arch, f"its {role} output alias points at {key!r}, which the blocks do not map")
            path = f"{block_path}.{layer}.{subs[key].name}"
            module = _submodule(hf_model, path, arch, f"the {role} output")
            post = _post_norm(module, cfg, arch, path) if key != role else None
            writers.append(Writer(role, layer, path, module, weights, post))
    return Architecture(arch, blocks, block_path, writers, sorted(set(lora)))


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
        gain_key, offset = None, 0.0
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
                out.append(StoredWriter(key, weight.name, axis, gain_key, offset))
    return out
