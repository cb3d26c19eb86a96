"""Remove a direction from the weights for good, and save the edited model as a normal checkpoint.

Every tensor that writes to the residual stream (token and position embeddings, attention and MLP output
projections, every routed and shared expert, their biases; listed by :mod:`probes.architecture`) is projected onto
the complement of the direction. On pre-norm, parallel and MoE blocks the model then behaves exactly as under
:func:`steering.hooks.ablate`.

Post-norm blocks (Gemma-2/3, OLMo-2) add ``g * u / rms(u)`` for a sublayer output ``u`` and norm gain ``g``: its
component along ``r`` is ``u . (g * r) / rms(u)``, so the output projection is orthogonalized against
``normalize(g * r)`` instead. The residual stream is then exactly orthogonal to ``r``, but ``rms(u)`` differs from
the hooked model's, so the logits are close to, not equal to, the hooks': :func:`steering.refusal` reports the KL.

Input and output embeddings that are tied (SmolLM2, Gemma) are untied first: the unembedding keeps its original
weights, as it does under the hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from probes.devices import is_offloaded
from probes.files import atomic_folder
from probes.models import ModelHandle
from steering.hooks import unit_direction


def _untie_embeddings(model: ModelHandle) -> bool:
    """Give the unembedding its own copy of the weights; True if they were tied."""
    hf = model.hf_model
    embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    old = embed.weight
    new = torch.nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    # the bridge wraps a copy of the module tree that shares parameters: repoint its unembedding too
    for tree in (hf, model.bridge.original_model):
        for module in tree.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is old:
                module.weight = new
    for config in {id(c): c for c in (hf.config, model.bridge.original_model.config)}.values():
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    return True


def _project_out_along(param: torch.Tensor, axis: int, u: torch.Tensor) -> None:
    """In place: remove from ``param`` the component along unit ``u`` of its ``axis`` (the d_model axis)."""
    view = param.data.movedim(axis, -1)
    view.sub_((view @ u).unsqueeze(-1) * u)


@torch.no_grad()
def orthogonalize(model: ModelHandle, direction: torch.Tensor) -> ModelHandle:
    """Edit the weights in place so no residual-stream write has a component along ``direction``.

    ``model.extra["orthogonalized"]`` records what was done: whether the edit equals the hooks exactly (False on
    post-norm architectures) and how many tensors were edited.
    """
    if torch.as_tensor(direction).dim() != 1:
        raise ValueError("orthogonalize takes one direction of shape [d_model]")
    if is_offloaded(model.hf_model):
        raise ValueError(f"model {model.name!r} has weights offloaded by accelerate (to the CPU or disk), which an "
                         "in-memory edit cannot change; edit the checkpoint on disk one shard at a time instead: "
                         "python -m steering.orthogonalize --checkpoint PATH --direction FILE --out OUT")
    r = unit_direction(model, direction)
    arch = model.architecture  # an unsupported architecture fails here, before any weight is touched
    _untie_embeddings(model)
    # float32 arithmetic in a float32 model, like the hooks: the edit lands closest to the float32 hooks
    edited = 0
    for writer in arch.writers:
        gain = writer.post_norm.gain() if writer.post_norm is not None else None
        u = r if gain is None else torch.nn.functional.normalize((gain.to(r) * r).double(), dim=0).to(r)
        for weight in writer.weights:
            _project_out_along(weight.param, weight.axis, u.to(device=weight.param.device, dtype=weight.param.dtype))
            edited += 1
    model.extra["orthogonalized"] = {"exact": arch.exact_orthogonalization, "tensors_edited": edited,
                                     "post_norm": arch.post_norm}
    return model


MODEL_CARD = """---
library_name: transformers
base_model: {base}
tags: [interpretability, refusal-direction, weight-orthogonalization]
---

# {source}, direction removed

`{source}` with one direction removed from every weight that writes to the residual stream (token and position
embeddings, attention and MLP output projections, every expert, and their biases: {tensors} tensors), following
Arditi et al. (2024), "Refusal in Language Models Is Mediated by a Single Direction". Written by the
interpretability workbench.

- {exactness}

- direction: difference in means at layer {layer}, position {position} (`direction.safetensors`, unit norm;
  `direction.json` has the metadata)
- input and output embeddings untied: {untied} (the unembedding keeps the original weights)
- load with `transformers.AutoModelForCausalLM.from_pretrained(path)`; no custom code

{notes}
"""


def save_checkpoint(model: ModelHandle, path: str | os.PathLike, direction: torch.Tensor, layer: int,
                    position: int, source_model: str | None = None, notes: str = "", overwrite: bool = False
                    ) -> Path:
    """``save_pretrained`` plus tokenizer, direction (+ layer, position, source model) and a model card.

    Written into a temporary folder beside ``path`` and renamed into place: on failure nothing half-written is left,
    and with ``overwrite`` an existing checkpoint is only removed once the new one is complete.
    """
    edit = model.extra.get("orthogonalized")
    if not edit:
        raise ValueError("this model was never orthogonalized: call steering.orthogonalize.orthogonalize(model, "
                         "direction) first (a checkpoint of the unedited weights would carry a card saying otherwise)")
    if not 0 <= int(layer) < model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1}, got {layer}")
    source_model = source_model or (model.name if model.name == model.source else f"{model.name} ({model.source})")
    exactness = ("the edit equals ablating the direction with hooks at inference (pre-norm blocks)" if edit["exact"]
                 else "post-norm blocks: each output projection is orthogonalized against the direction as its "
                      "post-norm sees it (normalize(g * r)), so the residual stream is exactly orthogonal to the "
                      "direction but the logits differ slightly from the hook ablation (see the KL in the notes)")
    with atomic_folder(path, overwrite) as tmp:
        model.hf_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        save_file({"direction": unit_direction(model, direction).float().cpu().contiguous()},
                  str(tmp / "direction.safetensors"))
        meta = {"source_model": source_model, "base_model": model.source, "layer": int(layer),
                "position": int(position), "untied_embeddings": not model.hf_model.config.tie_word_embeddings,
                "orthogonalization": edit}
        (tmp / "direction.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(MODEL_CARD.format(base=model.source, source=source_model, layer=layer,
                                                         position=position, untied=meta["untied_embeddings"],
                                                         tensors=edit["tensors_edited"], exactness=exactness,
                                                         notes=notes))
    return Path(path)
