"""Builders shared by several test files: random SAEs, sequences a model predicts itself, padded logits."""

from __future__ import annotations

from typing import Sequence

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

GREEDY_PROMPTS = ("The capital of France is", "Once upon a time there was", "1 2 3 4")


def make_sae(d_in: int, hook_name: str | None = "blocks.1.hook_resid_pre", d_sae: int = 32,
             seed: int = 0) -> StandardSAE:
    """A seeded random SAE of width ``d_in`` recorded at ``hook_name`` (None: no hook point recorded), with
    unit-norm decoder rows."""
    torch.manual_seed(seed)
    metadata = SAEMetadata(**({"hook_name": hook_name} if hook_name else {}))
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=1))
    return sae


def greedy_ids(model, prompts: Sequence[str] = GREEDY_PROMPTS, max_new_tokens: int = 16) -> list[list[int]]:
    """Each prompt followed by the model's own greedy continuation: sequences a random model predicts itself, so
    that zero-ablating a residual point raises its loss."""
    ids = []
    for text in prompts:
        prompt = torch.tensor([model.tokenizer(text)["input_ids"]], device=model.device)
        out = model.hf_model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)
        ids.append(out[0].tolist())
    return ids


def padded_logits(model, prompts: Sequence[str]) -> torch.Tensor:
    """Logits at every position of ``prompts`` run as one right-padded batch through the plain model."""
    enc = model.tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        return model.hf_model(**enc).logits
