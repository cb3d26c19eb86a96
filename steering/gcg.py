"""Greedy Coordinate Gradient (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned Language
Models"): an adversarial suffix that makes a chat model start its answer with a target such as "Sure, here is".

It lives in ``steering/`` although it writes nothing to the model: it optimises an input that steers the model's
behaviour, and serves the steering analyses (:mod:`steering.suffix_attack` asks whether it suppresses the refusal
direction). Written after the paper's Algorithm 1 and nanoGCG's source (0.3.0) rather than depending on nanoGCG,
which pins ``transformers<=4.47.1``; no prefix cache (the full prompt is run each step), one suffix on one prompt.

Each step: the gradient of the target's loss with respect to the one-hot suffix tokens (:func:`token_gradient`);
``search_width`` candidates, each replacing ``n_replace`` random positions by one of the ``topk`` tokens with the
most negative gradient there (:func:`sample_candidates`), dropped if the suffix does not survive decode and
re-encode; the candidate with the lowest loss is kept. The current suffix competes too, so the kept loss never
rises.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from probes.files import atomic_write_json
from probes.models import ModelHandle
from probes.provenance import weights_fingerprint
from probes.readers import read_json

MARKER = "SUFFIX_MARKER_5c1e"


@dataclass(kw_only=True)
class GCGConfig:
    """The search: steps, candidates per step, top-k tokens per position, positions replaced per candidate."""

    steps: int = 50
    search_width: int = 64
    topk: int = 64
    n_replace: int = 1
    max_seconds: float | None = None  # stop after the step that passes this wall time
    init: str = "x x x x x x x x x x x x x x x x x x x x"  # nanoGCG's default: 20 tokens of " x"
    batch_size: int = 64
    seed: int = 0
    allow_non_ascii: bool = False


@dataclass(frozen=True)
class AttackPrompt:
    """A chat prompt split around the suffix: ``before + suffix + after`` is the prompt, ``target`` the answer."""

    before: list[int]
    after: list[int]
    target: list[int]

    def ids(self, suffix: Sequence[int]) -> list[int]:
        return [*self.before, *suffix, *self.after]


@dataclass
class GCGResult:
    """The suffix found, the kept loss after each step (``losses[0]``: the initial suffix) and the settings."""

    instruction: str
    target: str
    suffix_ids: list[int]
    suffix: str
    losses: list[float]
    seconds: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path, model: ModelHandle) -> Path:
        """The result as JSON with the model's name and weights fingerprint (read back by :meth:`load`)."""
        return atomic_write_json(Path(path), {**self.to_dict(), "model": model.name,
                                              "weights": weights_fingerprint(model)}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "GCGResult":
        data = read_json(Path(path), "rerun the GCG search that wrote it")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def attack_prompt(model: ModelHandle, instruction: str, target: str) -> AttackPrompt:
    """``instruction`` in the chat template with a suffix slot right after it (``instruction + suffix`` as the user
    turn), tokenised on either side of the slot, and the target answer's tokens."""
    text = model.format_chat(instruction + MARKER)
    before, after = text.split(MARKER)
    tok = model.tokenizer
    return AttackPrompt(tok(before, add_special_tokens=False)["input_ids"],
                        tok(after, add_special_tokens=False)["input_ids"],
                        tok(target, add_special_tokens=False)["input_ids"])


def allowed_tokens(model: ModelHandle, allow_non_ascii: bool = False) -> torch.Tensor:
    """Boolean mask [vocab]: tokens a suffix may use (no special tokens; printable ASCII unless allowed)."""
    tok = model.tokenizer
    vocab = model.hf_model.get_input_embeddings().weight.shape[0]
    special = set(tok.all_special_ids)
    mask = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tok))):
        text = tok.decode([i])
        mask[i] = i not in special and text.strip() != "" and (allow_non_ascii or (text.isascii()
                                                                                 and text.isprintable()))
    return mask


def _embeds(model: ModelHandle, prompt: AttackPrompt, suffix_embeds: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, d] of ``before + suffix + after + target`` with the suffix given as embeddings."""
    embed = model.hf_model.get_input_embeddings()
    before = embed(torch.tensor(prompt.before, device=model.device))
    rest = embed(torch.tensor(prompt.after + prompt.target, device=model.device))
    n = suffix_embeds.shape[0]
    return torch.cat([before.expand(n, -1, -1), suffix_embeds, rest.expand(n, -1, -1)], dim=1)


def _target_loss(model: ModelHandle, prompt: AttackPrompt, embeds: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens after each row of ``embeds``: [B]."""
    n_target = len(prompt.target)
    logits = model.hf_model(inputs_embeds=embeds, use_cache=False, logits_to_keep=n_target + 1).logits[:, :-1]
    target = torch.tensor(prompt.target, device=logits.device).expand(logits.shape[0], -1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(-1)


def token_gradient(model: ModelHandle, prompt: AttackPrompt, suffix: Sequence[int]) -> tuple[torch.Tensor, float]:
    """The gradient of the target loss with respect to the one-hot suffix tokens [len(suffix), vocab], and the
    loss."""
    weight = model.hf_model.get_input_embeddings().weight
    one_hot = torch.zeros(len(suffix), weight.shape[0], dtype=weight.dtype, device=weight.device)
    one_hot[torch.arange(len(suffix)), torch.tensor(list(suffix))] = 1
    one_hot.requires_grad_(True)
    loss = _target_loss(model, prompt, _embeds(model, prompt, (one_hot @ weight)[None]))[0]
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad, float(loss.detach())


def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, config: GCGConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """``search_width`` suffixes [B, S], each with ``n_replace`` random positions set to one of the ``topk``
    allowed tokens of most negative gradient there."""
    grad = grad.masked_fill(~allowed.to(grad.device), float("inf"))
    top = (-grad).topk(config.topk, dim=1).indices.cpu()  # [S, k]
    width, n = config.search_width, config.n_replace
    positions = torch.rand(width, len(suffix), generator=generator).argsort(dim=1)[:, :n]  # [B, n]
    choice = torch.randint(0, config.topk, (width, n), generator=generator)
    return suffix.repeat(width, 1).scatter(1, positions, top[positions, choice])


def _round_trips(model: ModelHandle, candidates: torch.Tensor) -> torch.Tensor:
    """The candidates whose decoded text re-encodes to the same tokens (all of them if none does)."""
    tok = model.tokenizer
    keep = [tok(tok.decode(c), add_special_tokens=False)["input_ids"] == c.tolist() for c in candidates]
    return candidates[torch.tensor(keep)] if any(keep) else candidates


@torch.no_grad()
def candidate_losses(model: ModelHandle, prompt: AttackPrompt, candidates: torch.Tensor, batch_size: int
                     ) -> torch.Tensor:
    """The target loss of each candidate suffix [B] (float32, CPU)."""
    embed = model.hf_model.get_input_embeddings()
    return torch.cat([_target_loss(model, prompt, _embeds(model, prompt, embed(chunk.to(model.device)))).float().cpu()
                      for chunk in candidates.split(batch_size)])


def gcg(model: ModelHandle, instruction: str, target: str, config: GCGConfig | None = None,
        on_step: Callable[[int, float], None] | None = None) -> GCGResult:
    """Optimise a suffix for ``instruction`` so that the model answers with ``target`` (see the module docstring);
    ``on_step(step, loss)`` is called after each step."""
    config = config or GCGConfig()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    prompt = attack_prompt(model, instruction, target)
    allowed = allowed_tokens(model, config.allow_non_ascii)
    suffix = torch.tensor(model.tokenizer(config.init, add_special_tokens=False)["input_ids"])
    losses = [float(candidate_losses(model, prompt, suffix[None], 1)[0])]
    for step in range(config.steps):
        grad, _ = token_gradient(model, prompt, suffix.tolist())
        candidates = _round_trips(model, sample_candidates(suffix, grad, allowed, config, generator))
        candidates = torch.cat([suffix[None], candidates])
        scores = candidate_losses(model, prompt, candidates, config.batch_size)
        best = int(scores.argmin())
        suffix = candidates[best]
        losses.append(float(scores[best]))
        if on_step is not None:
            on_step(step, losses[-1])
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            break
    return GCGResult(instruction, target, suffix.tolist(), model.tokenizer.decode(suffix), losses,
                     time.perf_counter() - start, asdict(config))
