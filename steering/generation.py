"""Batched greedy generation from chat prompts (left padding), on the plain HF model so steering hooks apply."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from probes.models import ModelHandle


def chat_token_ids(model: ModelHandle, instructions: Sequence[str]) -> list[list[int]]:
    """Token ids of each instruction wrapped in the chat template (special tokens come from the template)."""
    return [model.tokenizer(model.format_chat(text), add_special_tokens=False)["input_ids"] for text in instructions]


def left_pad(model: ModelHandle, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return input_ids.to(model.device), mask.to(model.device)


@torch.inference_mode()
def generate(model: ModelHandle, instructions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
             progress: bool = True) -> list[str]:
    """Greedy completions of chat-formatted instructions, in the order given."""
    if not instructions:
        raise ValueError("no instructions to generate from")
    ids = chat_token_ids(model, instructions)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
        rows = order[start:start + batch_size]
        input_ids, mask = left_pad(model, [ids[i] for i in rows])
        new = model.hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=model.tokenizer.pad_token_id)[:, input_ids.shape[1]:]
        for i, text in zip(rows, model.tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text
    return out


@torch.inference_mode()
def next_token_logits(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Logits of the first answer token after each chat-formatted instruction: [n, vocab] float32."""
    ids = chat_token_ids(model, instructions)
    rows = []
    for start in range(0, len(ids), batch_size):
        input_ids, mask = left_pad(model, ids[start:start + batch_size])
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        rows.append(model.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                   use_cache=False, logits_to_keep=1).logits[:, -1].float())
    return torch.cat(rows)


def next_token_logprobs(model: ModelHandle, instructions: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the first answer token: [n, vocab] float32."""
    return torch.log_softmax(next_token_logits(model, instructions, batch_size), -1)
