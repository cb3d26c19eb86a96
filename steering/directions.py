"""Candidate directions: difference in means of two groups of prompts, per layer and token position."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from probes.cache import extract_group_means
from probes.errors import as_list
from probes.models import ModelHandle
from probes.progress import progress_bar
from steering.generation import chat_token_ids, pad


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
    means = extract_group_means(model, ids, labels, hooks=[f"blocks.{l}.hook_resid_pre" for l in layers],
                                positions=positions, progress=progress)
    candidates = CandidateDirections(means.difference("positive", "negative"), positions, layers, len(positive),
                                     len(negative))
    if outlier_ratio:
        candidates = candidates.without_dims(outlier_dimensions(model, list(positive) + list(negative), outlier_ratio,
                                                                progress=progress))
    return candidates


@torch.inference_mode()
def outlier_dimensions(model: ModelHandle, instructions: Sequence[str], ratio: float = 10.0, batch_size: int = 16,
                       progress: bool = True) -> list[int]:
    """Residual-stream dimensions with massive activations on chat-formatted ``instructions``.

    A dimension is an outlier when its mean absolute value over the tokens (the first token, an attention sink, left
    out) is more than ``ratio`` times the median dimension's, at the input of any block. Such dimensions hold large,
    nearly constant values in every token; a difference in means picks up small relative shifts in them, and ablating
    a direction that contains them moves every token, which shows up as KL on harmless prompts that has nothing to
    do with the behaviour being removed (Sun et al. 2024, "Massive activations in large language models").
    """
    if not instructions:
        raise ValueError("need at least one instruction to measure activation sizes")
    if ratio <= 1:
        raise ValueError(f"ratio must be > 1, got {ratio}")
    ids = chat_token_ids(model, instructions)
    total = torch.zeros(model.n_layers, model.d_model, dtype=torch.float64, device=model.device)
    count = 0
    for start in progress_bar(range(0, len(ids), batch_size), desc="outlier dimensions", unit="batch",
                              progress=progress):
        input_ids, mask = pad(model, ids[start:start + batch_size], "right")
        hidden = model.hf_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                                use_cache=False, logits_to_keep=1).hidden_states[:model.n_layers]
        keep = mask.bool()
        keep[:, 0] = False
        # each block's hidden states on its own device when the model is spread over devices
        total += torch.stack([h[keep.to(h.device)].abs().double().sum(0).to(total.device) for h in hidden])
        count += int(keep.sum())
    mean_abs = total / max(count, 1)
    relative = mean_abs / mean_abs.median(dim=-1, keepdim=True).values.clamp(min=1e-12)
    return sorted(int(i) for i in (relative > ratio).any(0).nonzero()[:, 0])
