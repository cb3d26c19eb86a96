"""Contrastive decoding baselines of SpARE: context-aware decoding (CAD) and DoLa, greedy, batched, with the KV cache.

SpARE (Zhao et al., NAACL 2025, "Steering Knowledge Selection Behaviours in LLMs via SAE-Based Representation
Engineering") compares its edits with these two decoding methods, which need no training.

**CAD** (Shi et al., NAACL 2024, "Trusting Your Evidence: Hallucinate Less with Context-aware Decoding") scores the
next token ``y`` as ``(1 + alpha) * logit(y | c, x) - alpha * logit(y | x)``: the model that reads the context ``c``
against the same model without it, which amplifies what the context changes; ``alpha`` 0 is plain greedy decoding.
The reverse contrast, toward memory, ``(1 + alpha) * logit(y | x) - alpha * logit(y | c, x)``, is the same call with
the two id lists swapped. Both conditionings of a batch share one forward pass per step: the prompts with context and
their context-free prompts are stacked as rows ``[with context; without]``, left-padded together (positions counted
over the real tokens, :func:`probes.forward.position_ids`); the token chosen for a pair is fed to both of its rows
through the KV cache.

**DoLa** (Chuang et al., ICLR 2024, "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language
Models"; reference code github.com/voidism/DoLa, whose logic transformers 4.x carried as ``_dola_decoding``)
contrasts the final layer's next-token distribution with the early exit of a premature layer, chosen at each step
and for each prompt among candidate layers as the one whose distribution is furthest from the final one (the
reference's divergence, see :func:`dola_divergence`): the score is ``log p_final(y) - log p_premature(y)`` on the
tokens with ``p_final(y) >= relative_top * max p_final`` (the adaptive plausibility constraint), -inf elsewhere.
Layers are indexed as Hugging Face's ``output_hidden_states``: 0 is the embedding output, ``l`` the residual stream
after block ``l - 1``. As in the reference, the final distribution is the model's own logits (with any scaling or
soft-capping the model applies), and a premature layer's early exit is the unembedding applied to its hidden state
*without* the final norm (the reference's choice, questioned in voidism/DoLa issue #9 and kept by transformers);
``final_norm=True`` applies the norm first (the logit lens). transformers 5 moved DoLa out of the library into a Hub
repository (``custom_generate="transformers-community/dola"``, downloaded and run as remote code), which an offline
machine cannot fetch: hence this implementation.

Both methods decode greedily with no repetition penalty (the DoLa reference recommends 1.2 for long open-ended text;
short answers do not need it). A completion stops at an end-of-sequence token, after ``max_new_tokens``, or, with
``first_line``, once its first line is complete (leading whitespace and newlines do not count): the answer is the
first line, cut as :func:`probes.forward.generate` cuts it. Prompts are sorted by length into batches and the answers
come back in the order given; an out-of-memory error halves the batch.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from probes.architecture import final_norm_and_unembedding
from probes.devices import Halving, execution_device
from probes.forward import _first_line, cache_kwarg, pad_id, pad_token_ids, position_ids
from probes.models import ModelHandle
from probes.progress import progress_bar

Picker = Callable[[object], torch.Tensor]  # a forward's output -> the next token of each pair [n]

# ---------------------------------------------------------------------------------------------------- scores


def cad_scores(with_context: torch.Tensor, without_context: torch.Tensor, alpha: float) -> torch.Tensor:
    """CAD's next-token scores ``(1 + alpha) * with_context - alpha * without_context`` from logits [b, vocab]."""
    return (1 + alpha) * with_context - alpha * without_context


def dola_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor) -> torch.Tensor:
    """How far each premature layer's next-token distribution is from the final layer's, as the DoLa reference
    computes it: ``0.5 * (KL(m || p) + KL(m || q))`` with ``p`` the final softmax, ``q`` a premature one and
    ``m = (p + q) / 2``, summed over the vocabulary: [b, K] from logits [b, vocab] and [b, K, vocab].

    The reference names it the Jensen-Shannon divergence, which is ``0.5 * (KL(p || m) + KL(q || m))``; both are
    symmetric and zero only when ``p = q``, but they can rank layers differently (this one grows without bound where
    ``q`` is tiny and ``p`` is not). The reference averages over the vocabulary instead of summing: the same ranking."""
    final = torch.log_softmax(final_logits.float(), -1)[:, None]
    early = torch.log_softmax(premature_logits.float(), -1)
    log_m = torch.logaddexp(final, early) - math.log(2)
    return 0.5 * (log_m.exp() * (2 * log_m - final - early)).sum(-1)


def dola_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor, relative_top: float = 0.1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa's next-token scores [b, vocab] and the index [b] of the premature layer chosen for each row, from the
    final layer's logits [b, vocab] and the K candidates' early-exit logits [b, K, vocab].

    Each row contrasts with the candidate of largest :func:`dola_divergence` (the reference picks one layer for the
    whole batch by the batch mean, so its choice depends on the company a prompt keeps; at its batch size of one the
    two agree): ``log p_final - log p_premature`` where ``p_final >= relative_top * max p_final``, -inf elsewhere."""
    _check_relative_top(relative_top)
    if premature_logits.dim() != 3 or premature_logits.shape[0] != final_logits.shape[0] \
            or premature_logits.shape[-1] != final_logits.shape[-1] or premature_logits.shape[1] == 0:
        raise ValueError(f"premature logits must be [b, K >= 1, vocab] beside final logits [b, vocab]; got "
                         f"{tuple(premature_logits.shape)} and {tuple(final_logits.shape)}")
    final = torch.log_softmax(final_logits.float(), -1)
    chosen = dola_divergence(final_logits, premature_logits).argmax(-1)
    early = torch.log_softmax(premature_logits.float(), -1)[torch.arange(len(chosen)), chosen]
    plausible = final >= final.max(-1, keepdim=True).values + math.log(relative_top)
    return torch.where(plausible, final - early, -math.inf), chosen


def _check_relative_top(relative_top: float) -> None:
    if not 0 < relative_top < 1:
        raise ValueError(f"relative_top must lie in (0, 1), got {relative_top}")


def candidate_layer_buckets(n_layers: int, tied_embeddings: bool = False) -> dict[str, list[int]]:
    """DoLa's candidate premature layers, as transformers' ``dola_layers="low"`` and ``"high"`` (hidden-state
    indices, 0 the embeddings): every second layer from the start up to ``n_layers // 2`` ("low") and from
    ``n_layers // 2`` to the last block ("high"); above 40 layers, the first and last 20 layers instead. With tied
    embeddings the embedding layer's early exit mostly predicts the input token again, so "low" starts at layer 2
    (1 for a 2-layer model). E.g. 32 layers: low 0, 2, ..., 14, high 16, 18, ..., 30 (the paper's buckets [0, 16) and
    [16, 32), even layers); SmolLM2-135M (30, tied): low 2, 4, ..., 14, high 15, 17, ..., 29. Where that leaves "low"
    empty (3 layers, tied) it is ``[n_layers // 2]``."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    start = 0 if not tied_embeddings else min(2, n_layers - 1)
    half = n_layers // 2
    low = list(range(start, half if n_layers <= 40 else 20, 2)) or [half]
    high = list(range(half, n_layers, 2) if n_layers <= 40 else range(n_layers - 20, n_layers, 2))
    return {"low": low, "high": high}


# ---------------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
def contrastive_generate(model: ModelHandle, prompt_ids: Sequence[Sequence[int]],
                         contrast_ids: Sequence[Sequence[int]], alpha: float, max_new_tokens: int = 32,
                         batch_size: int = 16, progress: bool = True, first_line: bool = True) -> list[str]:
    """Greedy CAD completions, in the order given: prompt ``i`` is ``prompt_ids[i]`` (with the context) contrasted
    with ``contrast_ids[i]`` (the same question without it) at strength ``alpha`` >= 0 (0: plain greedy decoding of
    ``prompt_ids``). Swap the two lists to contrast toward memory. ``batch_size`` counts pairs: a forward pass runs
    twice as many rows."""
    _check_generation(prompt_ids, max_new_tokens, batch_size)
    if len(contrast_ids) != len(prompt_ids):
        raise ValueError(f"need one contrast prompt per prompt: {len(prompt_ids)} prompts, {len(contrast_ids)} "
                         "contrast prompts")
    if not alpha >= 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")

    def pick(out) -> torch.Tensor:
        logits = out.logits[:, -1].float()
        n = len(logits) // 2
        return cad_scores(logits[:n], logits[n:], alpha).argmax(-1)

    def decode(items: list[int]) -> list[str]:
        rows = [prompt_ids[i] for i in items] + [contrast_ids[i] for i in items]
        return _greedy(model, rows, 2, pick, max_new_tokens, first_line)

    lengths = [max(len(a), len(b)) for a, b in zip(prompt_ids, contrast_ids, strict=True)]
    return _in_length_order(lengths, batch_size, progress, "CAD", decode)


@torch.inference_mode()
def dola_generate(model: ModelHandle, prompt_ids: Sequence[Sequence[int]], candidate_layers: Sequence[int] | str,
                  max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True, relative_top: float = 0.1,
                  first_line: bool = True, final_norm: bool = False) -> list[str]:
    """Greedy DoLa completions of token-id prompts, in the order given (see :func:`dola_scores`): one forward pass
    per step with the hidden states, the early exits of ``candidate_layers`` (hidden-state indices in
    ``[0, n_layers)``, or "low" / "high" from :func:`candidate_layer_buckets`) by the unembedding alone as in the
    reference, or after the final norm with ``final_norm``."""
    _check_generation(prompt_ids, max_new_tokens, batch_size)
    _check_relative_top(relative_top)
    layers = _candidate_layers(model, candidate_layers)
    norm, unembed = final_norm_and_unembedding(model.bridge, model.hf_model)
    where = execution_device(norm if final_norm else unembed)

    def pick(out) -> torch.Tensor:
        final = out.logits[:, -1].float()
        hidden = torch.stack([out.hidden_states[layer][:, -1].to(where) for layer in layers], 1)  # [b, K, d]
        hidden = norm(hidden).to(execution_device(unembed)) if final_norm else hidden
        early = unembed(hidden).float().to(final.device)
        return dola_scores(final, early, relative_top)[0].argmax(-1)

    def decode(items: list[int]) -> list[str]:
        return _greedy(model, [prompt_ids[i] for i in items], 1, pick, max_new_tokens, first_line,
                       hidden_states=True)

    return _in_length_order([len(p) for p in prompt_ids], batch_size, progress, "DoLa", decode)


def _candidate_layers(model: ModelHandle, candidate_layers: Sequence[int] | str) -> list[int]:
    """The candidate layers asked for, checked against the model's depth; a bucket name read for this model."""
    if isinstance(candidate_layers, str):
        buckets = candidate_layer_buckets(model.n_layers, _tied_embeddings(model))
        if candidate_layers not in buckets:
            raise ValueError(f"candidate_layers must be a list of layers or one of {sorted(buckets)}, got "
                             f"{candidate_layers!r}")
        return buckets[candidate_layers]
    layers = list(candidate_layers)
    if not layers:
        raise ValueError("candidate_layers is empty: give at least one premature layer")
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)
           or not 0 <= layer < model.n_layers]
    if bad:
        raise ValueError(f"candidate layers must be hidden-state indices in [0, {model.n_layers}) (0: the "
                         f"embeddings; {model.n_layers}, the final layer, is what they are contrasted with); got {bad}")
    return layers


def _tied_embeddings(model: ModelHandle) -> bool:
    config = model.hf_model.config
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _check_generation(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> None:
    if not prompt_ids:
        raise ValueError("no prompts to generate from")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {max_new_tokens} and {batch_size}")


def _in_length_order(lengths: Sequence[int], batch_size: int, progress: bool, desc: str,
                     decode: Callable[[list[int]], list[str]]) -> list[str]:
    """``decode`` on batches of item indices sorted by length (halved on out-of-memory errors), answers back in the
    order of ``lengths``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out = [""] * len(lengths)
    bar = progress_bar(total=len(lengths), desc=desc, unit="prompt", progress=progress)

    def run(items: list[int]) -> None:
        for i, text in zip(items, decode(items), strict=True):
            out[i] = text
        bar.update(len(items))

    halving = Halving(desc)
    with bar:
        for start in range(0, len(order), batch_size):
            halving.run(order[start:start + batch_size], run)
    return out


def stop_ids(model: ModelHandle) -> set[int]:
    """The end-of-sequence ids: the tokenizer's and the generation config's (one id or several)."""
    ids = model.hf_model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({model.tokenizer.eos_token_id} if model.tokenizer.eos_token_id is not None else set())


def answer_complete(text: str, first_line: bool) -> bool:
    """Whether a completion decoded so far already holds its whole answer: with ``first_line``, a newline after
    the first non-whitespace character (leading blank lines do not end it, as :func:`probes.forward._first_line`
    skips them)."""
    return first_line and "\n" in text.lstrip()


def _greedy(model: ModelHandle, rows: list[Sequence[int]], groups: int, pick: Picker, max_new_tokens: int,
            first_line: bool, hidden_states: bool = False) -> list[str]:
    """Greedy completions of ``n = len(rows) / groups`` prompts whose ``groups`` conditionings are stacked in
    ``rows`` (group ``g``'s row ``i`` at ``g * n + i``): one left-padded forward pass per step over every row, with
    the KV cache; ``pick`` turns the output into each prompt's next token, fed to all its rows."""
    n = len(rows) // groups
    input_ids, mask = pad_token_ids(rows, pad_id(model), "left", model.device)
    positions, cache, cache_name = position_ids(mask), None, cache_kwarg(model.hf_model)
    new: list[list[int]] = [[] for _ in range(n)]
    live, stops = [True] * n, stop_ids(model)
    for _ in range(max_new_tokens):
        out = model.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, output_hidden_states=hidden_states, **{cache_name: cache})
        cache, tokens = out[cache_name], pick(out).to(input_ids.device)
        for i, token in enumerate(tokens.tolist()):
            if live[i]:
                new[i].append(token)
                live[i] = token not in stops and not answer_complete(
                    model.tokenizer.decode(new[i], skip_special_tokens=True), first_line)
        if not any(live):
            break
        input_ids = tokens.repeat(groups)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        positions = positions[:, -1:] + 1
    texts = model.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [_first_line(text) if first_line else text for text in texts]
