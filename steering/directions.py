"""Candidate directions: difference in means of two groups of prompts, per layer and token position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from probes.cache import extract_group_means
from probes.models import ModelHandle
from steering.generation import chat_token_ids


@dataclass
class CandidateDirections:
    """``vectors`` [n_positions, n_layers, d] (float64): mean(positive) - mean(negative) at the input of each block
    (``blocks.{layer}.hook_resid_pre``), for the negative token ``positions`` and the ``layers`` listed."""

    vectors: torch.Tensor
    positions: list[int]
    layers: list[int]
    n_positive: int = 0
    n_negative: int = 0

    def get(self, position: int, layer: int) -> torch.Tensor:
        """The candidate at one (position, layer): [d]."""
        if position not in self.positions or layer not in self.layers:
            raise KeyError(f"no candidate at position {position}, layer {layer}; positions {self.positions}, "
                           f"layers {self.layers}")
        return self.vectors[self.positions.index(position), self.layers.index(layer)]


def diff_in_means(model: ModelHandle, positive: Sequence[str], negative: Sequence[str],
                  positions: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                  progress: bool = True) -> CandidateDirections:
    """Difference in means of chat-formatted ``positive`` vs ``negative`` instructions (e.g. harmful vs harmless).

    Read at the residual stream entering each block (``blocks.{l}.hook_resid_pre``) and at ``positions``, by default
    the chat-template tokens after the instruction. Means are accumulated in float64 without keeping the rows.
    """
    if not positive or not negative:
        raise ValueError("both groups need at least one prompt")
    positions = list(positions or model.post_instruction_positions())
    layers = list(range(model.n_layers) if layers is None else layers)
    ids = chat_token_ids(model, list(positive) + list(negative))
    labels = ["positive"] * len(positive) + ["negative"] * len(negative)
    means = extract_group_means(model, ids, labels, hooks=[f"blocks.{l}.hook_resid_pre" for l in layers],
                                positions=positions, progress=progress)
    return CandidateDirections(means.difference("positive", "negative"), positions, layers, len(positive),
                               len(negative))
