"""Remove a direction from the weights for good, and save the edited model as a normal checkpoint.

Every matrix that writes to the residual stream (token embedding, attention output, MLP output, and their biases)
is projected onto the complement of the direction, so the model behaves exactly as under
:func:`steering.hooks.ablate`. Input and output embeddings that are tied (SmolLM2, Gemma) are untied first: the
unembedding keeps its original weights, as it does under the hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from probes.files import atomic_folder
from probes.models import ModelHandle
from steering.hooks import residual_writers, unit_direction


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


@torch.no_grad()
def orthogonalize(model: ModelHandle, direction: torch.Tensor) -> ModelHandle:
    """Edit the weights in place so no residual-stream write has a component along ``direction``."""
    if torch.as_tensor(direction).dim() != 1:
        raise ValueError("orthogonalize takes one direction of shape [d_model]")
    r = unit_direction(model, direction)
    _untie_embeddings(model)
    # float32 arithmetic, like the hooks: every float32 variant of this 30-layer model sits ~5e-5 (logits) from a
    # float64 reference, and the float32 edit lands closest to the float32 hooks
    for module in residual_writers(model):
        if isinstance(module, torch.nn.Embedding):
            w = module.weight  # [vocab, d]: each row is written to the residual stream
            w.sub_(torch.outer(w @ r, r))
            continue
        out = module.o_proj if hasattr(module, "o_proj") else module.down_proj
        w = out.weight  # [d, in]: the output lies in the column space
        w.sub_(torch.outer(r, r @ w))
        if out.bias is not None:
            out.bias.sub_((out.bias @ r) * r)
    model.extra["orthogonalized"] = True
    return model


MODEL_CARD = """---
library_name: transformers
base_model: {base}
tags: [interpretability, refusal-direction, weight-orthogonalization]
---

# {source}, direction removed

`{source}` with one direction removed from every weight matrix that writes to the residual stream (token
embedding, attention output, MLP output, and their biases), following Arditi et al. (2024), "Refusal in Language
Models Is Mediated by a Single Direction". Written by the interpretability workbench.

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
    source_model = source_model or (model.name if model.name == model.source else f"{model.name} ({model.source})")
    with atomic_folder(path, overwrite) as tmp:
        model.hf_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        save_file({"direction": unit_direction(model, direction).float().cpu().contiguous()},
                  str(tmp / "direction.safetensors"))
        meta = {"source_model": source_model, "base_model": model.source, "layer": int(layer),
                "position": int(position), "untied_embeddings": not model.hf_model.config.tie_word_embeddings}
        (tmp / "direction.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(MODEL_CARD.format(base=model.source, source=source_model, layer=layer,
                                                         position=position, untied=meta["untied_embeddings"],
                                                         notes=notes))
    return Path(path)
