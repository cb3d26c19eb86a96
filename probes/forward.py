"""The one forward path: token ids, padding, position ids, last-token logits, teacher-forced losses and generation.

Everything runs the plain Hugging Face model (``model.hf_model``), which shares its weights with the bridge, so the
steering hooks of :mod:`steering.hooks` apply. Activations are read by :func:`probes.cache.extract`, which pads with
:func:`pad_token_ids` too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Callable, ContextManager, Mapping, Sequence

import pandas as pd
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from probes.devices import Halving
from probes.errors import as_list
from probes.models import ModelHandle
from probes.progress import progress_bar

# Batches are padded to a multiple of this many tokens: on a GPU every new (batch, length) shape costs a fresh
# attention plan (cuDNN SDPA: ~2 ms of CPU each), which made batches of many lengths slower than few long ones.
PAD_MULTIPLE = 8
IGNORE = -100  # label of a token that no loss scores (PyTorch's ignore_index)

# ---------------------------------------------------------------------------------------------------- token ids


def chat_token_ids(model: ModelHandle, instructions: Sequence[str]) -> list[list[int]]:
    """Token ids of each instruction wrapped in the chat template (special tokens come from the template)."""
    return [model.tokenizer(model.format_chat(text), add_special_tokens=False)["input_ids"]
            for text in as_list(instructions, "instructions")]


def text_token_ids(model: ModelHandle, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of raw texts (no chat template) with the tokenizer's own special tokens, each cut to
    ``max_length`` tokens by the tokenizer's truncation."""
    texts = as_list(texts, "texts")
    if not texts:  # the tokenizer fails on an empty batch
        return []
    return model.tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]


def pad_id(model: ModelHandle) -> int:
    """The id that fills padding: the tokenizer's pad token, else 0 (padding is masked out either way)."""
    return model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0


def pad_token_ids(ids: Sequence[Sequence[int]], fill_id: int, side: str = "left",
                  device: torch.device | str = "cpu", multiple: int = PAD_MULTIPLE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one batch on ``device``, padded with ``fill_id`` on ``side`` to a multiple of ``multiple``
    tokens (default :data:`PAD_MULTIPLE`; 1 pads to the longest list): (input_ids, attention mask as long).

    Left padding ends every prompt in the last column (generation, last-token reads); right padding starts every
    sequence in the first (teacher forcing, reading every token)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not ids:
        raise ValueError("no token-id lists to pad")
    width = -(-max(map(len, ids)) // multiple) * multiple
    input_ids = torch.full((len(ids), width), fill_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[r, sl] = torch.tensor(list(row), dtype=torch.long)
        mask[r, sl] = 1
    return input_ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens only (0 on left padding), so a left-padded prompt is read at the
    positions it has alone."""
    return (mask.cumsum(1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------- next token


@torch.inference_mode()
def last_token_logits(model: ModelHandle, ids: Sequence[Sequence[int]],
                      module: torch.nn.Module | None = None) -> torch.Tensor:
    """Logits after the last token of each id list, in one left-padded forward pass: [n, vocab] float32.

    ``module``: the Hugging Face model to run (default ``model.hf_model``), e.g. a checkpoint reloaded with plain
    ``transformers`` that should give the same logits."""
    input_ids, mask = pad_token_ids(ids, pad_id(model), "left", model.device)
    module = model.hf_model if module is None else module
    return module(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                  logits_to_keep=1).logits[:, -1].float()


def next_token_logits(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32,
                      module: torch.nn.Module | None = None) -> torch.Tensor:
    """Logits of the first answer token after each chat-formatted instruction: [n, vocab] float32."""
    ids = chat_token_ids(model, instructions)
    return torch.cat([last_token_logits(model, ids[start:start + batch_size], module)
                      for start in range(0, len(ids), batch_size)])


def next_token_logprobs(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the first answer token: [n, vocab] float32."""
    return torch.log_softmax(next_token_logits(model, instructions, batch_size), -1)


# ---------------------------------------------------------------------------------------------------- teacher forcing


def answer_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], fill_id: int, device) -> dict:
    """(prompt + answer) ids right-padded to the longest, with labels on the answer tokens only (:data:`IGNORE`
    elsewhere)."""
    input_ids, mask = pad_token_ids([list(p) + list(t) for p, t in pairs], fill_id, "right", device, multiple=1)
    labels = torch.full(input_ids.shape, IGNORE, dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        labels[row, len(p): len(p) + len(t)] = torch.tensor(list(t), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels.to(device), "attention_mask": mask}


def teacher_forced_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each next token from logits [b, s, vocab]: [b, s - 1, vocab] float32."""
    return torch.log_softmax(logits[:, :-1].float(), -1)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Teacher-forced next-token cross-entropy (float32) of ``labels`` [b, s] (:data:`IGNORE` where not scored)
    under ``logits`` [b, s, vocab]: summed, or with ``reduction="none"`` one value per scored token, row by row."""
    targets = labels[:, 1:]
    scored = targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction=reduction)


def kl_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) over the last axis, from log-probabilities (e.g. [n, vocab] or [b, s, vocab])."""
    return (base.exp() * (base - other)).sum(-1)


@torch.inference_mode()
def answer_loss(model: ModelHandle, instructions: Sequence[str], answers: Sequence[str], batch_size: int = 16
                ) -> float:
    """Mean cross-entropy per answer token of ``answers`` (plus end of sequence) after the chat-formatted
    ``instructions``, teacher-forced; exp of it is the perplexity.

    The softmax runs over the vocabulary axis of [b, vocab, s] logits, not as :func:`answer_nll` does: that route
    is up to ~3e-4 per token further from float64, but it is the one the refusal results were measured with."""
    instructions, answers = as_list(instructions, "instructions"), as_list(answers, "answers")
    if len(instructions) != len(answers) or not answers:
        raise ValueError("need one answer per instruction, and at least one")
    eos = model.tokenizer.eos_token or ""
    targets = [model.tokenizer(a.strip() + eos, add_special_tokens=False)["input_ids"] for a in answers]
    pairs = list(zip(chat_token_ids(model, instructions), targets, strict=True))
    nll, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = answer_batch(pairs[i:i + batch_size], pad_id(model), model.device)
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                       ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return nll / count


# ---------------------------------------------------------------------------------------------------- generation


def _first_line(text: str) -> str:
    """The first line of a continuation after its leading whitespace, stripped: a short answer."""
    return text.strip().split("\n", 1)[0].strip()


_LINE_TABLES: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _line_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token id: whether its text holds a line break, holds non-blank text, and holds non-blank text followed
    by a line break (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _LINE_TABLES:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _LINE_TABLES[key] = tuple(torch.tensor(flags) for flags in zip(
            *[("\n" in t, t.strip() != "", "\n" in t.lstrip()) for t in texts], strict=True))
    return _LINE_TABLES[key]


class FirstLineDone(StoppingCriteria):
    """Stops generation once every row's first line (after leading whitespace, as :func:`_first_line` cuts it) is
    complete: a line break has followed some non-blank text. What a row generates after that is cut anyway, so the
    answers are those of a run to ``max_new_tokens``, sooner."""

    def __init__(self, tokenizer):
        self.breaks, self.text, self.closes = _line_tables(tokenizer)
        self.seen, self.done = None, None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        token = input_ids[:, -1].cpu()
        if self.seen is None:
            self.seen = torch.zeros(len(token), dtype=torch.bool)
            self.done = torch.zeros(len(token), dtype=torch.bool)
        token = token.clamp(max=len(self.breaks) - 1)
        self.done |= (self.seen & self.breaks[token]) | self.closes[token]
        self.seen |= self.text[token]
        return self.done.to(input_ids.device)


# A shared prefix shorter than this is recomputed per prompt (caching it would not pay).
SHARED_PREFIX_MIN = 16
_IN_SHARED_PREFIX = [False]


def in_shared_prefix() -> bool:
    """True while :func:`generate_from_ids` runs the prompts' shared prefix (once, then reused from its KV cache): an
    edit of the last prompt token must leave that pass alone, since its last token is not the prompt's."""
    return _IN_SHARED_PREFIX[0]


def common_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every id list shares."""
    shortest = min(len(i) for i in ids)
    for k in range(shortest):
        if any(i[k] != ids[0][k] for i in ids[1:]):
            return k
    return shortest


def cache_kwarg(module: torch.nn.Module) -> str:
    """The name of the KV cache in a model's arguments and outputs: ``cache`` in recent transformers (5.24
    deprecates ``past_key_values``), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _prefix_cache(model: ModelHandle, prefix: Sequence[int]):
    """The KV cache of ``prefix`` (batch 1), computed with :func:`in_shared_prefix` true."""
    _IN_SHARED_PREFIX[0] = True
    try:
        out = model.hf_model(input_ids=torch.tensor([list(prefix)], device=model.device), use_cache=True)
        return getattr(out, cache_kwarg(model.hf_model))
    finally:
        _IN_SHARED_PREFIX[0] = False


@torch.inference_mode()
def generate(model: ModelHandle, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
             progress: bool = True, temperature: float = 0.0, seed: int = 0, chat: bool = True,
             first_line: bool = False, share_prefix: bool = False) -> list[str]:
    """Completions of ``prompts`` in the order given: chat-formatted instructions, or with ``chat=False`` raw texts
    (e.g. few-shot prompts); see :func:`generate_from_ids`."""
    ids = chat_token_ids(model, prompts) if chat else text_token_ids(model, prompts)
    return generate_from_ids(model, ids, max_new_tokens, batch_size, progress, temperature, seed, first_line,
                             share_prefix)


@torch.inference_mode()
def generate_from_ids(model: ModelHandle, ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                      batch_size: int = 32, progress: bool = True, temperature: float = 0.0, seed: int = 0,
                      first_line: bool = False, share_prefix: bool = False) -> list[str]:
    """Completions of token-id prompts (chat-formatted or plain text), in the order given, in left-padded batches
    of prompts of similar length (an out-of-memory error halves the batch).

    ``temperature`` 0 is greedy decoding; above 0 the next token is sampled from the full softmax at that
    temperature (no top-k or top-p cut). The torch RNG is seeded with ``seed`` either way; sampling runs on a
    forked RNG, so a sampled run is reproducible on the same device with the same batch size and leaves the global
    RNG alone. A completion stops at the end-of-sequence token or after ``max_new_tokens``; with ``first_line`` only
    its first line is kept (a short answer).

    ``share_prefix``: the tokens every prompt starts with (e.g. few-shot demonstrations; all but the last two of the
    shortest prompt at most) run once and are reused from their KV cache; each row is the prefix, its padding, then
    the rest of its prompt (positions continue after the prefix). Same answers up to float rounding, several times
    less compute when the prefix is most of the prompt."""
    if not ids:
        raise ValueError("no prompts to generate from")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = progress_bar(total=len(ids), desc="generate", unit="prompt", progress=progress)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    shared = min(common_prefix_length(ids), min(len(i) for i in ids) - 2) if share_prefix else 0
    prefix = _prefix_cache(model, ids[0][:shared]) if shared >= SHARED_PREFIX_MIN else None

    def run(rows: list[int]) -> None:
        cut = shared if prefix is not None else 0
        input_ids, mask = pad_token_ids([ids[i][cut:] for i in rows], pad_id(model), "left", model.device)
        cache = {}
        if prefix is not None:  # prefix, padding, rest of the prompt
            head = torch.tensor([ids[rows[0]][:cut]], device=model.device).expand(len(rows), cut)
            input_ids, mask = torch.cat([head, input_ids], 1), torch.cat([torch.ones_like(head), mask], 1)
            name = cache_kwarg(model.hf_model)
            cache[name] = copy.deepcopy(prefix)
            cache[name].batch_repeat_interleave(len(rows))
        stop = StoppingCriteriaList([FirstLineDone(model.tokenizer)] if first_line else [])
        new = model.hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=model.tokenizer.pad_token_id, stopping_criteria=stop,
                                      **cache, **sampling)[:, input_ids.shape[1]:]
        for i, text in zip(rows, model.tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
            out[i] = _first_line(text) if first_line else text
        bar.update(len(rows))

    halving = Halving("generate")  # out of device memory: half the batch, and on
    devices = [model.device] if torch.device(model.device).type == "cuda" else []
    with bar, torch.random.fork_rng(devices=devices, enabled=temperature > 0):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            halving.run(order[start:start + batch_size], run)
    return out


def side_by_side(model: ModelHandle, instructions: Sequence[str],
                 edits: Mapping[str, Callable[[], ContextManager] | None], max_new_tokens: int = 32,
                 progress: bool = True) -> pd.DataFrame:
    """Greedy completions of ``instructions`` under each edit, one column per edit (None: the model as it is),
    e.g. ``{"baseline": None, "ablated": lambda: ablate(model, r), "added": lambda: add(model, r, layer)}``."""
    columns = {"instruction": as_list(instructions, "instructions")}
    for name, edit in edits.items():
        with edit() if edit else contextlib.nullcontext():
            columns[name] = generate(model, columns["instruction"], max_new_tokens, progress=progress)
    return pd.DataFrame(columns)


@torch.inference_mode()
def answer_token_nll(model: ModelHandle, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
                     ) -> torch.Tensor:
    """Mean cross-entropy per token of each answer after its raw-text prompt (no chat template; the answer is
    tokenized on its own, so give it its leading space), teacher-forced: [n] float32 on the CPU."""
    prompts, answers = as_list(prompts, "prompts"), as_list(answers, "answers")
    if len(prompts) != len(answers) or not answers:
        raise ValueError("need one answer per prompt, and at least one")
    targets = [model.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if any(not t for t in targets):
        raise ValueError("every answer needs at least one token")
    pairs = list(zip(text_token_ids(model, prompts), targets, strict=True))
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = answer_batch(pairs[i:i + batch_size], pad_id(model), model.device)
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                ignore_index=IGNORE, reduction="none")
        out.append((nll.sum(1) / (labels != IGNORE).sum(1)).cpu())
    return torch.cat(out)
