"""Candidate directions: difference in means of two groups of prompts, per layer and token position; and the one
direction selected from them, saved with where it came from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from probes.cache import extract, extract_group_means
from probes.errors import WorkbenchError, as_list
from probes.files import atomic_file, atomic_write_json
from probes.forward import chat_token_ids
from probes.models import ModelHandle
from probes.progress import progress_bar
from probes.readers import check_safetensors, load_safetensors, read_json


@dataclass
class CandidateDirections:
    """``vectors`` [n_positions, n_layers, d] (float64): mean(positive) - mean(negative) at the input of each block
    (``blocks.{layer}.hook_resid_pre``), for the negative token ``positions`` and the ``layers`` listed."""

    vectors: torch.Tensor
    positions: list[int]
    layers: list[int]
    n_positive: int = 0
    n_negative: int = 0
    excluded_dims: list[int] = field(default_factory=list)

    def get(self, position: int, layer: int) -> torch.Tensor:
        """The candidate at one (position, layer): [d]."""
        if position not in self.positions or layer not in self.layers:
            raise KeyError(f"no candidate at position {position}, layer {layer}; positions {self.positions}, "
                           f"layers {self.layers}")
        return self.vectors[self.positions.index(position), self.layers.index(layer)]

    def without_dims(self, dims: Sequence[int]) -> "CandidateDirections":
        """A copy with the residual-stream dimensions ``dims`` set to zero in every candidate."""
        vectors = self.vectors.clone()
        vectors[..., list(dims)] = 0
        return CandidateDirections(vectors, self.positions, self.layers, self.n_positive, self.n_negative,
                                   sorted(set(self.excluded_dims) | set(dims)))

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """One safetensors file, written atomically: the vectors, and in its header the rest of the candidates and
        ``metadata`` (e.g. the settings they were made with), so that the two are never paired with another's."""
        header = {"positions": self.positions, "layers": self.layers, "n_positive": self.n_positive,
                  "n_negative": self.n_negative, "excluded_dims": self.excluded_dims, "metadata": metadata or {}}
        with atomic_file(path) as tmp:
            save_file({"vectors": self.vectors.detach().cpu().contiguous()}, str(tmp),
                      metadata={"candidates": json.dumps(header)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["CandidateDirections", dict]:
        """Candidates saved by :meth:`save` (vectors on the CPU), and the ``metadata`` saved with them."""
        remedy = "delete it and rerun (the directions are recomputed)"
        header = check_safetensors(path, remedy).get("candidates")
        if header is None:
            raise WorkbenchError(f"{path} holds no candidate directions (no 'candidates' header); {remedy}")
        header = json.loads(header)
        vectors = load_safetensors(path, remedy)["vectors"]
        return cls(vectors, header["positions"], header["layers"], header["n_positive"], header["n_negative"],
                   header["excluded_dims"]), header["metadata"]


DIRECTION_FILE = "direction.safetensors"
DIRECTION_REMEDY = "pass a direction saved by the workbench, e.g. OUT/checkpoint/direction.safetensors"


@dataclass
class SelectedDirection:
    """One direction and where it came from, saved as ``direction.safetensors`` (the tensor ``direction``) and
    ``direction.json`` beside it (every other field). One schema wherever the workbench writes a direction (a
    refusal selection, an orthogonalized checkpoint); the fields that do not apply are null."""

    vector: torch.Tensor  # [d_model]; unit norm beside a checkpoint, as selected (a difference in means) elsewhere
    layer: int | None = None  # the block whose input it was read at
    position: int | None = None  # the token position (negative: counted from the end of the prompt)
    source_model: str | None = None  # the model it was found on, or the checkpoint it was removed from
    weights: str | None = None  # that model's weights fingerprint (probes.provenance.weights_fingerprint)
    selection: dict | None = None  # the selected candidate's scores (steering.refusal.CandidateScore)
    excluded_dims: list[int] = field(default_factory=list)  # residual dimensions left out of it
    n_positive: int | None = None  # prompts of each group of the difference in means
    n_negative: int | None = None
    base_model: str | None = None  # beside an orthogonalized checkpoint: the model it was edited from
    untied_embeddings: bool | None = None  # ... whether its embeddings were untied
    orthogonalization: dict | None = None  # ... what the edit did (probes.models.Orthogonalization)
    direction_file: str | None = None  # ... the file the direction was read from, if any

    def metadata(self) -> dict:
        """Every field but the vector: the content of ``direction.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "vector"}

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/direction.safetensors`` (float32) and ``folder/direction.json``, each written atomically;
        returns the first."""
        path = Path(folder) / DIRECTION_FILE
        with atomic_file(path) as tmp:
            save_file({"direction": self.vector.detach().float().cpu().contiguous()}, str(tmp))
        atomic_write_json(path.with_suffix(".json"), self.metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SelectedDirection":
        """A direction saved by :meth:`save` (``path``: the folder or its ``direction.safetensors``), or any
        safetensors file holding one vector (then with whatever a JSON file of the same name beside it says).
        Keys of ``direction.json`` that are not fields are ignored, so older files load too."""
        path = Path(path)
        path = path / DIRECTION_FILE if path.is_dir() else path
        tensors = load_safetensors(path, DIRECTION_REMEDY)
        vector = tensors.get("direction", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if vector is None or vector.dim() != 1:
            shown = ", ".join(f"{key} {list(t.shape)}" for key, t in tensors.items()) or "no tensor"
            raise WorkbenchError(f"{path} holds {shown}, not one direction: expected a tensor named 'direction' or a "
                                 f"single vector [d_model]; {DIRECTION_REMEDY}")
        meta_path = path.with_suffix(".json")
        meta = read_json(meta_path, "delete it or fix it") if meta_path.is_file() else {}
        known = {f.name for f in fields(cls)} - {"vector"}
        return cls(vector, **{k: v for k, v in meta.items() if k in known} if isinstance(meta, dict) else {})


def diff_in_means(model: ModelHandle, positive: Sequence[str], negative: Sequence[str],
                  positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                  outlier_ratio: float | None = None, progress: bool = True) -> CandidateDirections:
    """Difference in means of chat-formatted ``positive`` vs ``negative`` instructions (e.g. harmful vs harmless).

    Read at the residual stream entering each block (``blocks.{l}.hook_resid_pre``) and at ``positions``, by default
    the chat-template tokens after the instruction. Means are accumulated in float64 without keeping the rows.
    With ``outlier_ratio``, the dimensions :func:`outlier_dimensions` finds on both groups are set to zero in every
    candidate (listed in ``excluded_dims``); by default none are (the paper's plain difference in means).
    """
    positive, negative = as_list(positive, "positive"), as_list(negative, "negative")
    if not positive or not negative:
        raise ValueError("both groups need at least one prompt")
    positions = list(positions or model.post_instruction_positions())
    layers = list(range(model.n_layers) if layers is None else layers)
    ids = chat_token_ids(model, list(positive) + list(negative))
    labels = ["positive"] * len(positive) + ["negative"] * len(negative)
    means = extract_group_means(model, ids, labels, hooks=[f"blocks.{layer}.hook_resid_pre" for layer in layers],
                                positions=positions, progress=progress)
    candidates = CandidateDirections(means.difference("positive", "negative"), positions, layers, len(positive),
                                     len(negative))
    if outlier_ratio:
        candidates = candidates.without_dims(outlier_dimensions(model, list(positive) + list(negative), outlier_ratio,
                                                                progress=progress))
    return candidates


def outlier_dimensions(model: ModelHandle, instructions: Sequence[str], ratio: float = 10.0, batch_size: int = 16,
                       progress: bool = True) -> list[int]:
    """Residual-stream dimensions with massive activations on chat-formatted ``instructions``.

    A dimension is an outlier when its mean absolute value over the tokens (the first token, an attention sink, left
    out) is more than ``ratio`` times the median dimension's, at the input of any block. Such dimensions hold large,
    nearly constant values in every token; a difference in means picks up small relative shifts in them, and ablating
    a direction that contains them moves every token, which shows up as KL on harmless prompts that has nothing to
    do with the behaviour being removed (Sun et al. 2024, "Massive activations in large language models").
    Every token is read by :func:`probes.cache.extract`, ``batch_size`` instructions per forward pass.
    """
    if not instructions:
        raise ValueError("need at least one instruction to measure activation sizes")
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    ids = chat_token_ids(model, instructions)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]
    total = torch.zeros(model.n_layers, model.d_model, dtype=torch.float64, device=model.device)
    count = 0
    for start in progress_bar(range(0, len(ids), batch_size), desc="outlier dimensions", unit="batch",
                              progress=progress):
        chunk = ids[start:start + batch_size]  # one forward pass, as many tokens as it takes
        cache = extract(model, chunk, hooks, positions="all", batch_tokens=len(chunk) * max(map(len, chunk)),
                        progress=False)
        acts = cache.acts[~cache.first_tokens()]
        total += acts.abs().double().sum(0).to(total.device)
        count += acts.shape[0]
    mean_abs = total / max(count, 1)
    relative = mean_abs / mean_abs.median(dim=-1, keepdim=True).values.clamp(min=1e-12)
    return sorted(int(i) for i in (relative > ratio).any(0).nonzero()[:, 0])
