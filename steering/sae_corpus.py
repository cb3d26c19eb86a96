"""Text and activations for training SAEs on a model that has none: a corpus built from the shipped data (few-shot
conflict prompts, chat-formatted instructions, headlines) and the model's own answers, and the residual stream of
every token of it.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from probes.conflict import conflict_prompts, known_facts_candidates
from probes.datasets import load_entities, load_refusal_instructions
from probes.models import ModelHandle
from probes.progress import progress_bar
from steering.generation import generate
from steering.sae import sae_positions


def corpus(model: ModelHandle, n_conflict: int = 600, n_instructions: int = 1500, n_answers: int = 200,
           n_headlines: int = 1500, seed: int = 0, progress: bool = True) -> list[str]:
    """Shuffled training texts: conflict prompts (original and substituted contexts), harmless instructions in the
    model's chat template, some of them followed by the model's own greedy answer, and news headlines."""
    rng = random.Random(seed)
    facts = known_facts_candidates(n=1000, seed=seed)
    facts = rng.sample(facts, min(n_conflict, len(facts)))
    texts = conflict_prompts(facts, "sub") + conflict_prompts(facts, "org")
    instructions = rng.sample(load_refusal_instructions("train", "harmless"), n_instructions)
    chat = [model.tokenizer.apply_chat_template([{"role": "user", "content": i}], tokenize=False,
                                                add_generation_prompt=True) for i in instructions]
    answers = generate(model, instructions[:n_answers], max_new_tokens=48, progress=progress) if n_answers else []
    texts += [c + a for c, a in zip(chat, answers)] + chat[n_answers:]
    texts += load_entities("headline", n=n_headlines, seed=seed).entities
    rng.shuffle(texts)
    return texts


@torch.inference_mode()
def token_activations(model: ModelHandle, texts: Sequence[str], layers: Sequence[int], max_tokens: int | None = None,
                      batch_size: int = 32, max_length: int = 256, progress: bool = True) -> dict[int, torch.Tensor]:
    """Residual stream entering each block of ``layers`` at every token an SAE acts on (padding and BOS dropped, see
    :func:`steering.sae.sae_positions`): {layer: [n_tokens, d_model]} float32 on the model's device, cut at
    ``max_tokens``."""
    if not texts:
        raise ValueError("no texts")
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be in 0..{model.n_layers - 1}, got {list(layers)}")
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    total = 0
    for start in progress_bar(range(0, len(texts), batch_size), desc="token activations", progress=progress):
        enc = model.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(model.device)
        hidden = model.hf_model(**enc, output_hidden_states=True, use_cache=False,
                                logits_to_keep=1).hidden_states
        keep = sae_positions(model, enc["input_ids"], enc["attention_mask"].bool())
        for layer in layers:
            # each block's hidden states sit on its own device when the model is spread over devices
            chunks[layer].append(hidden[layer][keep.to(hidden[layer].device)].float().to(model.device))
        total += int(keep.sum())
        if max_tokens is not None and total >= max_tokens:
            break
    return {layer: torch.cat(c)[:max_tokens] for layer, c in chunks.items()}
