"""Batched generation (greedy or sampled) from chat or plain prompts (left padding), on the plain HF model so
steering hooks apply."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Sequence

import pandas as pd
import torch

from probes.cache import pad_token_ids
from probes.errors import as_list
from probes.devices import Halving
from probes.models import ModelHandle
from probes.progress import progress_bar


def chat_token_ids(model: ModelHandle, instructions: Sequence[str]) -> list[list[int]]:
    """Token ids of each instruction wrapped in the chat template (special tokens come from the template)."""
    return [model.tokenizer(model.format_chat(text), add_special_tokens=False)["input_ids"]
            for text in as_list(instructions, "instructions")]


def pad(model: ModelHandle, ids: Sequence[Sequence[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists padded into one batch on the model's device: (input_ids, attention mask as long)."""
    return pad_token_ids(model, ids, side, model.device)


def left_pad(model: ModelHandle, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch (generation and last-token reads need the prompts to end in the same column)."""
    return pad(model, ids, "left")


@torch.inference_mode()
def generate(model: ModelHandle, instructions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
             progress: bool = True, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Completions of chat-formatted instructions, in the order given: greedy, or sampled at ``temperature``."""
    return generate_from_ids(model, chat_token_ids(model, instructions), max_new_tokens, batch_size, progress,
                             temperature, seed)


@torch.inference_mode()
def generate_from_ids(model: ModelHandle, ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                      batch_size: int = 32, progress: bool = True, temperature: float = 0.0, seed: int = 0
                      ) -> list[str]:
    """Completions of token-id prompts (chat-formatted or plain text), in the order given.

    ``temperature`` 0 is greedy decoding; above 0 the next token is sampled from the full softmax at that
    temperature (no top-k or top-p cut), from a torch generator seeded with ``seed`` (the global RNG is left
    alone), so a run is reproducible on the same device with the same batch size."""
    if not ids:
        raise ValueError("no prompts to generate from")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    bar = progress_bar(total=len(ids), desc="generate", unit="prompt", progress=progress)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)

    def run(rows: list[int]) -> None:
        input_ids, mask = left_pad(model, [ids[i] for i in rows])
        new = model.hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=model.tokenizer.pad_token_id, **sampling)[:, input_ids.shape[1]:]
        for i, text in zip(rows, model.tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text
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
def last_token_logits(model: ModelHandle, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits after the last token of each id list, in one left-padded forward pass: [n, vocab] float32."""
    input_ids, mask = left_pad(model, ids)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return model.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                          logits_to_keep=1).logits[:, -1].float()


def next_token_logits(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Logits of the first answer token after each chat-formatted instruction: [n, vocab] float32."""
    ids = chat_token_ids(model, instructions)
    return torch.cat([last_token_logits(model, ids[start:start + batch_size])
                      for start in range(0, len(ids), batch_size)])


def next_token_logprobs(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the first answer token: [n, vocab] float32."""
    return torch.log_softmax(next_token_logits(model, instructions, batch_size), -1)


def answer_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device) -> dict:
    """Right-padded (prompt + answer) ids with labels on the answer tokens only (-100 elsewhere)."""
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        seq = list(p) + list(t)
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p): len(seq)] = torch.tensor(list(t))
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def answer_loss(model: ModelHandle, instructions: Sequence[str], answers: Sequence[str], batch_size: int = 16
                ) -> float:
    """Mean cross-entropy per answer token of ``answers`` (plus end of sequence) after the chat-formatted
    ``instructions``, teacher-forced; exp of it is the perplexity."""
    instructions, answers = as_list(instructions, "instructions"), as_list(answers, "answers")
    if len(instructions) != len(answers) or not answers:
        raise ValueError("need one answer per instruction, and at least one")
    eos = model.tokenizer.eos_token or ""
    pairs = list(zip(chat_token_ids(model, instructions),
                     [model.tokenizer(a.strip() + eos, add_special_tokens=False)["input_ids"] for a in answers]))
    nll, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = answer_batch(pairs[i:i + batch_size], model.tokenizer.pad_token_id or 0, model.device)
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return nll / count
