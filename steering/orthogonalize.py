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

A checkpoint too large for memory is edited on disk, one safetensors shard at a time, with the same edit
(:func:`orthogonalize_checkpoint`, or ``python -m steering.orthogonalize --checkpoint PATH --direction FILE --out
OUT``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from probes.architecture import StoredWriter, meta_architecture, stored_writers
from probes.cli_args import run_cli
from probes.devices import is_offloaded
from probes.errors import WorkbenchError
from probes.files import atomic_folder
from probes.forward import kl_divergence, next_token_logits
from probes.models import ModelHandle, Orthogonalization
from probes.progress import progress_bar
from probes.readers import CorruptFileError, read_json
from probes.settings import OutputSettings, parse_settings, setting
from steering.directions import DIRECTION_FILE, SelectedDirection
from steering.hooks import ablate, unit_direction


def _untie_embeddings(model: ModelHandle) -> bool:
    """Give the unembedding its own copy of the weights; True if they were tied and the edit changes the token
    embedding (not OPT's with ``project_in``, which is edited instead)."""
    hf = model.hf_model
    embed, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    edited = {id(w.param) for writer in model.architecture.writers for w in writer.weights}
    if head is None or head.weight is not embed.weight or id(embed.weight) not in edited:
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


def orthogonalize_tensor(weight: torch.Tensor, axis: int, r: torch.Tensor, gain: torch.Tensor | None = None,
                         centered: bool = False) -> torch.Tensor:
    """``weight`` with no component along unit ``r`` on its d_model ``axis``; behind a post-norm of gain ``gain``,
    along ``normalize(gain * r)`` instead (see the module docstring), with its mean removed first behind a
    LayerNorm (``centered``: it subtracts the mean of its input, so only the centred direction is seen).

    The one edit of both :func:`orthogonalize` and :func:`orthogonalize_checkpoint`: arithmetic in float32 (float64
    for float64 weights), result in ``weight``'s dtype. A float32 or float64 ``weight`` is edited in place; use the
    returned tensor either way.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u = r.to(device=weight.device, dtype=dtype)
    if gain is not None or centered:
        v = (1.0 if gain is None else gain.to(u).double()) * u.double()
        u = torch.nn.functional.normalize(v - v.mean() if centered else v, dim=0).to(dtype)
    work = weight.to(dtype)
    view = work.movedim(axis, -1)
    view.sub_((view @ u).unsqueeze(-1) * u)
    return work.to(weight.dtype)


@torch.no_grad()
def orthogonalize(model: ModelHandle, direction: torch.Tensor) -> ModelHandle:
    """Edit the weights in place so no residual-stream write has a component along ``direction``.

    ``model.orthogonalization`` records what was done: whether the edit equals the hooks exactly (False on
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
        norm = writer.post_norm
        gain = norm.gain() if norm is not None else None
        for weight in writer.weights:
            behind = not weight.after_norm  # a norm's own bias is added after it: orthogonal to r itself
            weight.param.data.copy_(orthogonalize_tensor(weight.param.data, weight.axis, r, gain if behind else None,
                                                         behind and norm is not None and norm.centered))
            edited += 1
    model.orthogonalization = Orthogonalization(arch.exact_orthogonalization, edited, arch.post_norm)
    return model


def orthogonalize_against_hooks(model: ModelHandle, direction: torch.Tensor, prompts: Sequence[str],
                                batch_size: int = 32) -> dict:
    """:func:`orthogonalize` ``model`` in place, and how far the edited weights are from ablating ``direction``
    with hooks on the unedited model, on the next-token logits of ``prompts`` (chat template): the largest absolute
    logit difference, the same relative to the largest logit, and the mean KL(hooks || weights). About float32
    rounding where the edit is exact; what the edit costs on post-norm architectures."""
    with ablate(model, direction):
        hooked = next_token_logits(model, prompts, batch_size)
    orthogonalize(model, direction)
    edited = next_token_logits(model, prompts, batch_size)
    logit_diff = float((edited - hooked).abs().max())
    kl = kl_divergence(torch.log_softmax(hooked.double(), -1), torch.log_softmax(edited.double(), -1)).mean()
    return {"max_abs_logit_diff_orthogonalized_vs_hooks": logit_diff,
            "rel_logit_diff_orthogonalized_vs_hooks": logit_diff / float(hooked.abs().max()),
            "kl_orthogonalized_vs_hooks": float(kl), "orthogonalization": asdict(model.orthogonalization)}


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

- direction: {origin} (`direction.safetensors`, unit norm;
  `direction.json` has the metadata)
- input and output embeddings untied: {untied} (the unembedding keeps the original weights)
- load with `transformers.AutoModelForCausalLM.from_pretrained(path)`; no custom code

{notes}
"""


def _write_provenance(folder: Path, direction: SelectedDirection, origin: str, notes: str) -> None:
    """The direction (``direction.safetensors`` and ``direction.json``, see
    :class:`steering.directions.SelectedDirection`) and the model card of an orthogonalized checkpoint; ``origin``
    says where the direction comes from."""
    exact = direction.orthogonalization["exact"]
    exactness = ("the edit equals ablating the direction with hooks at inference (pre-norm blocks)" if exact
                 else "post-norm blocks: each output projection is orthogonalized against the direction as its "
                      "post-norm sees it (normalize(g * r)), so the residual stream is exactly orthogonal to the "
                      "direction but the logits differ slightly from the hook ablation (see the KL in the notes)")
    direction.save(folder)
    (folder / "README.md").write_text(MODEL_CARD.format(
        base=direction.base_model, source=direction.source_model, origin=origin, untied=direction.untied_embeddings,
        tensors=direction.orthogonalization["tensors_edited"], exactness=exactness, notes=notes))


def save_checkpoint(model: ModelHandle, path: str | os.PathLike, direction: torch.Tensor, layer: int,
                    position: int, source_model: str | None = None, notes: str = "", overwrite: bool = False
                    ) -> Path:
    """``save_pretrained`` plus tokenizer, direction (+ layer, position, source model) and a model card.

    Written into a temporary folder beside ``path`` and renamed into place: on failure nothing half-written is left,
    and with ``overwrite`` an existing checkpoint is only removed once the new one is complete.
    """
    edit = model.orthogonalization
    if edit is None:
        raise ValueError("this model was never orthogonalized: call steering.orthogonalize.orthogonalize(model, "
                         "direction) first (a checkpoint of the unedited weights would carry a card saying otherwise)")
    if not 0 <= int(layer) < model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1}, got {layer}")
    source_model = source_model or (model.name if model.name == model.source else f"{model.name} ({model.source})")
    with atomic_folder(path, overwrite) as tmp:
        model.hf_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        removed = SelectedDirection(unit_direction(model, direction), int(layer), int(position), source_model,
                                    base_model=model.source,
                                    untied_embeddings=not model.hf_model.config.tie_word_embeddings,
                                    orthogonalization=asdict(edit))
        _write_provenance(tmp, removed, f"difference in means at layer {layer}, position {position}", notes)
    return Path(path)


# ---------------------------------------------------------------------------------------- checkpoints on disk
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weights in other formats are not copied into the edited checkpoint: they would carry the unedited weights.
OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
WRITTEN_HERE = {INDEX, "README.md", DIRECTION_FILE, "direction.json"}


def _unit(vector: torch.Tensor, d_model: int, where: str) -> torch.Tensor:
    """``vector`` scaled to unit norm in float64, after checking its width against the checkpoint's d_model."""
    if vector.dim() != 1 or vector.numel() != d_model:
        raise WorkbenchError(f"the direction {where} has shape {list(vector.shape)}, but the checkpoint's d_model is "
                             f"{d_model}: it was computed on another model")
    vector = vector.double()
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise WorkbenchError(f"the direction {where} has zero or non-finite norm")
    return vector / norm


def checkpoint_files(checkpoint: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of a Hugging Face checkpoint folder, and its index (None for a single file)."""
    if not checkpoint.is_dir():
        raise WorkbenchError(f"{checkpoint} is not a folder; pass a Hugging Face checkpoint folder (config.json and "
                             "model*.safetensors)")
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint / 'config.json'} is missing: {checkpoint} is not a Hugging Face "
                                "checkpoint folder")
    if (checkpoint / INDEX).is_file():
        index = read_json(checkpoint / INDEX, "download the checkpoint again")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise WorkbenchError(f"{checkpoint / INDEX} has no weight_map; download the checkpoint again")
        names = sorted(set(index["weight_map"].values()))
        for name in names:
            if not (checkpoint / name).is_file():
                raise FileNotFoundError(f"shard {checkpoint / name} is missing (listed in {checkpoint / INDEX}); "
                                        "download the checkpoint again")
        return names, index
    if (checkpoint / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    others = sorted(p.name for p in checkpoint.iterdir() if p.suffix in OTHER_WEIGHTS)
    raise FileNotFoundError(f"{checkpoint} has no {SINGLE_FILE} or {INDEX}" + (f" (only {', '.join(others)})"
                            if others else "") + ": only safetensors checkpoints can be edited on disk")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a safetensors file, from its header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as err:
        raise CorruptFileError(path, "download the checkpoint again", err) from err


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _untied_head(model: torch.nn.Module, writers: list[StoredWriter], shard_of: dict[str, str]
                 ) -> dict[str, str]:
    """{embedding key: unembedding key} when the unembedding shares the token embedding's weights and the
    checkpoint stores them once: the unembedding is then written separately with the original weights, as
    :func:`orthogonalize` unties them. Empty otherwise."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        return {}
    head_key = next(f"{name}.weight" for name, module in model.named_modules() if module is head)
    embed_name = next(f"{name}.weight" for name, module in model.named_modules() if module is embed)
    embed_keys = [w.key for w in writers if w.param == embed_name]
    return {} if head_key in shard_of or len(embed_keys) != 1 else {embed_keys[0]: head_key}


def _edit_shard(src: Path, dst: Path, plan: dict[str, StoredWriter], r: torch.Tensor,
                gains: dict[str, torch.Tensor], copies: dict[str, str]) -> int:
    """Write ``src`` to ``dst`` with the tensors in ``plan`` orthogonalized, and each key of ``copies`` also saved,
    unedited, under its value; the bytes added. One shard in memory at a time."""
    with safe_open(str(src), framework="pt") as f:
        metadata, tensors = f.metadata(), {}
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key in copies:
                tensors[copies[key]] = tensor.clone()
            if key in plan:
                w = plan[key]
                gain = None if w.gain_key is None else gains[w.gain_key] + w.gain_offset
                # r rounded to the stored dtype, as the in-memory edit rounds it to the model's dtype
                tensor = orthogonalize_tensor(tensor, w.axis, r.to(tensor.dtype), gain, w.centered).contiguous()
            tensors[key] = tensor
    save_file(tensors, str(dst), metadata=metadata)
    return sum(tensors[new].nbytes for key, new in copies.items() if key in tensors)


def _write_config(checkpoint: Path, folder: Path, untie: bool) -> None:
    """config.json as it is, with the embeddings marked untied when the unembedding was written separately."""
    if not untie:
        shutil.copy2(checkpoint / "config.json", folder / "config.json")
        return
    config = read_json(checkpoint / "config.json", "download the checkpoint again")
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_index(index: dict, folder: Path, shard_of: dict[str, str], copies: dict[str, str], added: int) -> None:
    """The checkpoint's index, listing the unembedding written separately (in its embedding's shard)."""
    index = json.loads(json.dumps(index))
    index["weight_map"].update({new: shard_of[key] for key, new in copies.items()})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    if "total_size" in index.get("metadata", {}):
        index["metadata"]["total_size"] += added
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _copy_other_files(checkpoint: Path, folder: Path, shards: list[str]) -> None:
    """Config, generation config, tokenizer and any other top-level file, except weights in any format."""
    for path in checkpoint.iterdir():
        if (path.is_file() and path.name not in WRITTEN_HERE and path.name not in shards
                and path.suffix not in OTHER_WEIGHTS and path.name != "config.json"):
            shutil.copy2(path, folder / path.name)


def check_separate_folders(checkpoint: Path, out: Path) -> None:
    """Refuse an ``out`` that is the checkpoint folder (by any path, links resolved), inside it or around it: the
    edit would write into, or with overwrite replace, the weights it is reading."""
    source, target = checkpoint.resolve(), out.resolve()
    if target == source or source in target.parents or target in source.parents:
        where = "is" if target == source else "is inside" if source in target.parents else "contains"
        raise WorkbenchError(f"the output folder {out} {where} the checkpoint folder {checkpoint}: pick another folder "
                             "for the edited checkpoint")


@torch.no_grad()
def orthogonalize_checkpoint(checkpoint: str | os.PathLike, direction: str | os.PathLike | torch.Tensor,
                             out: str | os.PathLike, overwrite: bool = False, source_model: str | None = None,
                             notes: str = "", progress: bool = True) -> Path:
    """Remove ``direction`` from a Hugging Face checkpoint folder on disk, one safetensors shard at a time, into the
    new checkpoint folder ``out``: the same edit as :func:`orthogonalize` followed by :func:`save_checkpoint`, for
    models that do not fit in memory.

    ``direction`` is a tensor or a file (see :meth:`steering.directions.SelectedDirection.load`); the
    ``direction.json`` written beside the edited checkpoint keeps what the file's own said. Which tensors write to
    the residual stream is read from a model built on the meta device (:func:`probes.architecture.meta_architecture`).
    Peak memory is about one shard (its tensors, plus the pages of the file being read), never the whole model.
    ``out`` gets the edited shards, the index, config, generation config and tokenizer files, the direction and a
    model card; it is written atomically like :func:`save_checkpoint`. Weights in other formats (``.bin``,
    ``.pth``) are not copied. ``out`` may be neither ``checkpoint`` nor inside it nor around it.
    """
    checkpoint = Path(checkpoint)
    shards, index = checkpoint_files(checkpoint)
    check_separate_folders(checkpoint, Path(out))
    headers = {name: _shapes(checkpoint / name) for name in shards}
    shard_of = {key: name for name, header in headers.items() for key in header}
    shapes = {key: shape for header in headers.values() for key, shape in header.items()}
    config = AutoConfig.from_pretrained(checkpoint)
    arch, model = meta_architecture(config)
    d_model = config.get_text_config().hidden_size
    given = isinstance(direction, torch.Tensor)
    origin = SelectedDirection(direction) if given else SelectedDirection.load(direction)
    r = _unit(origin.vector, d_model, "given" if given else f"in {direction}")
    writers = stored_writers(arch, model, shapes)
    plan = {w.key: w for w in writers}
    gains = {w.gain_key: _read_tensor(checkpoint / shard_of[w.gain_key], w.gain_key)
             for w in writers if w.gain_key is not None}
    copies = _untied_head(model, writers, shard_of)
    added = 0
    with atomic_folder(out, overwrite) as tmp:
        _copy_other_files(checkpoint, tmp, shards)
        for name in progress_bar(shards, desc="orthogonalizing shards", progress=progress):
            added += _edit_shard(checkpoint / name, tmp / name, plan, r, gains,
                                 {k: v for k, v in copies.items() if shard_of[k] == name})
        if index is not None:
            _write_index(index, tmp, shard_of, copies, added)
        _write_config(checkpoint, tmp, bool(copies))
        removed = replace(origin, vector=r, source_model=source_model or str(checkpoint), base_model=str(checkpoint),
                          direction_file=None if given else str(direction),
                          untied_embeddings=bool(copies) or not config.get_text_config().tie_word_embeddings,
                          orthogonalization={"exact": arch.exact_orthogonalization,
                                             "tensors_edited": len({w.param for w in writers}),
                                             "post_norm": arch.post_norm, "checkpoint_tensors_edited": len(writers),
                                             "shard_by_shard": True})
        where = (f"difference in means at layer {origin.layer}, position {origin.position}"
                 if origin.layer is not None else "given as a tensor" if given else f"`{Path(direction).name}`")
        _write_provenance(tmp, removed, where, f"Edited on disk, shard by shard ({len(shards)} safetensors "
                                               f"files), from `{checkpoint}` by `python -m steering.orthogonalize`."
                                               + (f"\n\n{notes}" if notes else ""))
    return Path(out)


@dataclass(kw_only=True)
class OrthogonalizeSettings(OutputSettings):
    """Remove a direction from a Hugging Face checkpoint on disk, one safetensors shard at a time (peak memory about
    one shard), into a new checkpoint folder."""

    checkpoint: Path | None = setting(None, "Hugging Face checkpoint folder", parse=Path, required=True)
    direction: Path | None = setting(None, "direction.safetensors written by the workbench, or a safetensors file "
                                           "with one vector", parse=Path, required=True)
    out: Path | None = setting(None, "new checkpoint folder (another folder than --checkpoint, not inside it)",
                               parse=Path, required=True)
    source_model: str | None = setting(None, "model name for the card (default: the folder)")


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(OrthogonalizeSettings, argv, OrthogonalizeSettings.__doc__)
    out = orthogonalize_checkpoint(settings.checkpoint, settings.direction, settings.out,
                                   overwrite=settings.overwrite, source_model=settings.source_model)
    meta = json.loads((out / "direction.json").read_text())
    print(json.dumps({"checkpoint": str(out), **meta["orthogonalization"]}, indent=2))
    return meta


if __name__ == "__main__":
    run_cli(main, kept="the new checkpoint is renamed into place only once complete: nothing half-written is left")
