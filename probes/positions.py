"""Which token positions to read: resolved per prompt into token indices (or span weights) before extraction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

PositionSpec = Union[str, Sequence[int]]
# "all": every real token of every prompt (a cache of [n_tokens, n_hooks, d], see probes.cache.extract)
POSITION_MODES = ("last", "span_last", "span_mean", "all")


@dataclass(frozen=True)
class ResolvedPositions:
    """For a padded batch: ``index`` [b, P] token indices to gather, ``weights`` [b, s] to average over, or
    ``tokens`` [b, s] (bool) to keep every real token."""

    index: torch.Tensor | None
    weights: torch.Tensor | None
    tokens: torch.Tensor | None = None

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, s, d] -> [b, P, d]: only the requested tokens, never a copy of the whole sequence (on ``hidden``'s
        device, which differs from block to block on a model spread over devices); [n_real_tokens, d], row after
        row, for every token."""
        if self.tokens is not None:
            return hidden[self.tokens.to(hidden.device)]
        if self.weights is not None:
            return torch.einsum("bs,bsd->bd", self.weights.to(hidden.device, hidden.dtype), hidden).unsqueeze(1)
        idx = self.index.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return torch.gather(hidden, 1, idx)


def n_positions(spec: PositionSpec) -> int:
    return 1 if isinstance(spec, str) else len(spec)


def validate(spec: PositionSpec, has_spans: bool) -> PositionSpec:
    """Check a position spec early, with a message that lists the valid choices."""
    if isinstance(spec, str):
        if spec not in POSITION_MODES:
            raise ValueError(f"unknown position mode {spec!r}; use one of {POSITION_MODES} "
                             "or a list of negative token indices such as [-3, -2, -1]")
        if spec.startswith("span") and not has_spans:
            raise ValueError(f"position mode {spec!r} needs spans=[(start_char, end_char), ...], one per prompt "
                             "(see probes.positions.mark_span)")
        return spec
    spec = [int(i) for i in spec]
    if not spec or any(i >= 0 for i in spec):
        raise ValueError(f"position indices count from the end and must be negative (e.g. [-2, -1]), got {spec}")
    return spec


def mark_span(template: str, entity: str, placeholder: str = "{entity}") -> tuple[str, tuple[int, int]]:
    """Fill ``template`` with ``entity`` and return the prompt with the entity's character span."""
    if placeholder not in template:
        raise ValueError(f"template {template!r} has no {placeholder} placeholder")
    start = template.index(placeholder)
    prompt = template.replace(placeholder, entity, 1)
    return prompt, (start, start + len(entity))


def span_token_range(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """First and last token (inclusive) overlapping the character span, from a tokenizer's offset mapping."""
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise ValueError(f"character span {span} covers no token")
    return hits[0], hits[-1]


def resolve(spec: PositionSpec, attention_mask: torch.Tensor,
            token_spans: list[tuple[int, int]] | None) -> ResolvedPositions:
    """Token indices in padded coordinates for one batch (left or right padding)."""
    b, s = attention_mask.shape
    lengths = attention_mask.sum(1)
    # first real token of each row: 0 for right padding, s - length for left padding
    first = (attention_mask.cumsum(1) == 0).sum(1)
    if spec == "last":
        return ResolvedPositions(index=(first + lengths - 1).unsqueeze(1), weights=None)
    if spec == "all":
        return ResolvedPositions(index=None, weights=None, tokens=attention_mask.bool())
    if isinstance(spec, str):
        spans = torch.tensor(token_spans, device=attention_mask.device)
        lo, hi = first + spans[:, 0], first + spans[:, 1]
        if spec == "span_last":
            return ResolvedPositions(index=hi.unsqueeze(1), weights=None)
        ar = torch.arange(s, device=attention_mask.device)
        inside = ((ar >= lo[:, None]) & (ar <= hi[:, None])).float()
        return ResolvedPositions(index=None, weights=inside / inside.sum(1, keepdim=True))
    offsets = torch.tensor(spec, device=attention_mask.device)
    if (lengths < -offsets.min()).any():
        raise ValueError(f"position {int(offsets.min())} is before the start of a prompt of "
                         f"{int(lengths.min())} tokens")
    return ResolvedPositions(index=(first + lengths).unsqueeze(1) + offsets.unsqueeze(0), weights=None)
