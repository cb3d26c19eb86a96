"""Text and activations for training SAEs on a model that has none: a corpus built from the shipped data (few-shot
conflict prompts, chat-formatted instructions, headlines, Wikipedia passages) and the model's own text (its sampled
answers to the instructions and its sampled continuations of headline and passage openings), and the residual
stream of every token of it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

from probes.cache import extract
from probes.cli_args import non_negative_int, positive_float, positive_int
from probes.conflict import conflict_prompts, known_facts_candidates
from probes.datasets import load_entities, load_nqswap, load_refusal_instructions
from probes.forward import generate, generate_from_ids, pad_id, pad_token_ids, text_token_ids
from probes.models import ModelHandle
from probes.progress import progress_bar
from probes.settings import Settings, setting
from steering.sae import sae_positions

T = TypeVar("T")


@dataclass(kw_only=True)
class CorpusSettings(Settings):
    """What goes into an SAE training corpus; a count of ``None`` takes every text of that source.

    The defaults (those of the shipped SAEs) give 6,500 texts and 0.36M tokens, sized for a 2-core CPU (43 minutes
    for corpus, activations and two SAEs); on a GPU take every text of each source (pass ``None``) and many more of
    the model's own answers and continuations."""

    conflict_facts: int | None = setting(400, "corpus: known-fact candidates, each with its original and its "
                                              "substituted context", parse=non_negative_int)
    instructions: int | None = setting(2000, "corpus: harmless training instructions, in the model's chat template",
                                       parse=non_negative_int)
    answered: int | None = setting(300, "corpus: of those, how many are followed by the model's own sampled answer",
                                   parse=non_negative_int)
    headlines: int | None = setting(3000, "corpus: news headlines", parse=non_negative_int)
    passages: int | None = setting(400, "corpus: NQ-Swap's Wikipedia passages (the original contexts)",
                                   parse=non_negative_int)
    continuations: int = setting(300, "corpus: headline and passage openings continued by the model (sampled)",
                                 parse=non_negative_int)
    answer_tokens: int = setting(64, "corpus: tokens of each sampled answer", parse=positive_int)
    continuation_tokens: int = setting(64, "corpus: tokens of each sampled continuation", parse=positive_int)
    opening_words: int = setting(8, "corpus: words of a headline or passage kept as the opening to continue",
                                 parse=positive_int)
    temperature: float = setting(1.0, "corpus: sampling temperature of the model's own text", parse=positive_float)

    def __post_init__(self) -> None:
        super().__post_init__()
        counts = {k: getattr(self, k) for k in ("conflict_facts", "instructions", "answered", "headlines", "passages")}
        bad = {k: v for k, v in counts.items() if v is not None and v < 0}
        if bad or self.continuations < 0 or min(self.answer_tokens, self.continuation_tokens, self.opening_words) < 1:
            raise ValueError(f"corpus counts must be >= 0 and token counts >= 1, got {counts}, continuations "
                             f"{self.continuations}, answer_tokens {self.answer_tokens}, continuation_tokens "
                             f"{self.continuation_tokens}, opening_words {self.opening_words}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the model's own text is sampled), got {self.temperature}")


def _take(rng: random.Random, items: Sequence[T], n: int | None) -> list[T]:
    """A seeded sample of ``n`` items (all of them, shuffled, for None or n >= len)."""
    return rng.sample(list(items), len(items) if n is None else min(n, len(items)))


def _take_rest(rng: random.Random, items: Sequence[T], n: int | None) -> tuple[list[T], list[T]]:
    """The sample :func:`_take` draws (the same draws from ``rng``) and the items it leaves, in their order."""
    picked = _take(rng, range(len(items)), n)
    chosen = set(picked)
    return [items[i] for i in picked], [item for i, item in enumerate(items) if i not in chosen]


def _data_picks(settings: CorpusSettings, seed: int) -> tuple[random.Random, dict[str, tuple[list, list]]]:
    """The recipe's seeded picks from each data source and what each leaves: {source: (picked, rest)}, and the
    generator, where :func:`corpus_sources` goes on to draw the openings to continue."""
    rng = random.Random(seed)
    pools = {"facts": (known_facts_candidates(seed=seed), settings.conflict_facts),
             "instructions": (load_refusal_instructions("train", "harmless"), settings.instructions),
             "headlines": (load_entities("headline").entities, settings.headlines),
             "passages": (_passages(), settings.passages)}
    return rng, {name: _take_rest(rng, items, n) for name, (items, n) in pools.items()}


def _passages() -> list[str]:
    """NQ-Swap's distinct original Wikipedia passages, without their <P>/<Table>-style markup."""
    texts = (re.sub(r"\s+", " ", re.sub(r"</?[A-Za-z]+>", " ", t)).strip() for t in load_nqswap()["org_context"])
    return list(dict.fromkeys(t for t in texts if t))


def corpus_sources(model: ModelHandle, settings: CorpusSettings | None = None, seed: int = 0,
                   batch_size: int = 32, progress: bool = True) -> dict[str, list[str]]:
    """The corpus's texts by source, each list in a seeded order; the model's own text is sampled with ``seed``."""
    settings = settings or CorpusSettings()
    rng, picks = _data_picks(settings, seed)
    facts, instructions, headlines, passages = (picks[k][0] for k in ("facts", "instructions", "headlines", "passages"))
    n_answered = len(instructions) if settings.answered is None else min(settings.answered, len(instructions))
    chat = [model.format_chat(i) for i in instructions]
    answers = generate(model, instructions[:n_answered], settings.answer_tokens, batch_size, progress,
                       settings.temperature, seed) if n_answered else []
    openings = [" ".join(t.split()[:settings.opening_words]) for t in _take(rng, headlines + passages,
                                                                             settings.continuations)]
    ids = text_token_ids(model, openings)
    continued = generate_from_ids(model, ids, settings.continuation_tokens, batch_size, progress,
                                  settings.temperature, seed + 1) if ids else []
    return {"conflict_prompts": conflict_prompts(facts, "sub") + conflict_prompts(facts, "org"),
            "instructions_with_answers": [c + a for c, a in zip(chat, answers, strict=False)],
            "instructions": chat[n_answered:], "headlines": headlines, "passages": passages,
            "continuations": [o + c for o, c in zip(openings, continued, strict=True)]}


def heldout_sources(model: ModelHandle, settings: CorpusSettings | None = None, seed: int = 0) -> dict[str, list[str]]:
    """A held-out twin of the data part of :func:`corpus_sources` (same ``settings`` and ``seed``): as many texts of
    each data source, drawn from those the recipe leaves out, so an SAE trained on that corpus has never read them
    (to see what its latents do). Instructions come in the chat template without answers; the model writes
    nothing here (no sampled answers or continuations)."""
    settings = settings or CorpusSettings()
    rng, picks = _data_picks(settings, seed)
    facts, instructions, headlines, passages = (_take(rng, picks[k][1], len(picks[k][0]))
                                                for k in ("facts", "instructions", "headlines", "passages"))
    return {"conflict_prompts": conflict_prompts(facts, "sub") + conflict_prompts(facts, "org"),
            "instructions": [model.format_chat(i) for i in instructions], "headlines": headlines,
            "passages": passages}


def mix(sources: dict[str, list[str]], seed: int = 0) -> list[str]:
    """Every text of every source, shuffled (seeded)."""
    texts = [t for source in sources.values() for t in source]
    random.Random(seed).shuffle(texts)
    return texts


def corpus(model: ModelHandle, settings: CorpusSettings | None = None, seed: int = 0, batch_size: int = 32,
           progress: bool = True) -> list[str]:
    """The texts of :func:`corpus_sources`, shuffled."""
    return mix(corpus_sources(model, settings, seed, batch_size, progress), seed)


def token_activations(model: ModelHandle, texts: Sequence[str], layers: Sequence[int], max_tokens: int | None = None,
                      batch_size: int = 32, max_length: int = 256, progress: bool = True) -> dict[int, torch.Tensor]:
    """Residual stream entering each block of ``layers`` at every token an SAE acts on (padding and BOS dropped, see
    :func:`steering.sae.sae_positions`): {layer: [n_tokens, d_model]} float32 on the model's device, text after text,
    cut at ``max_tokens`` (later batches are never read). Each text is cut to ``max_length`` tokens; every token of
    ``batch_size`` texts at a time is read by :func:`probes.cache.extract`, in one forward pass padded to the
    longest of them (the shapes the shipped SAEs' activations were read in, so they come out bit for bit)."""
    if not texts:
        raise ValueError("no texts")
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be in 0..{model.n_layers - 1}, got {list(layers)}")
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    total = 0
    for start in progress_bar(range(0, len(texts), batch_size), desc="token activations", progress=progress):
        ids = text_token_ids(model, texts[start:start + batch_size], max_length)
        cache = extract(model, ids, hooks, positions="all", batch_tokens=len(ids) * max(map(len, ids)),
                        progress=False, pad_multiple=1)
        keep = _sae_tokens(model, ids).to(cache.acts.device)
        for j, layer in enumerate(layers):
            chunks[layer].append(cache.acts[keep, j])
        total += int(keep.sum())
        if max_tokens is not None and total >= max_tokens:
            break
    return {layer: torch.cat(c)[:max_tokens] for layer, c in chunks.items()}


def _sae_tokens(model: ModelHandle, ids: list[list[int]]) -> torch.Tensor:
    """[n_tokens] bool over every token of ``ids``, text after text: where an SAE acts (:func:`sae_positions`)."""
    input_ids, mask = pad_token_ids(ids, pad_id(model), "right", multiple=1)
    return sae_positions(model, input_ids, mask.bool())[mask.bool()]
