"""Per-architecture check of the interventions, as a table: how orthogonal the residual stream is under ``ablate``
and under the weight edit, and how far the edited model is from the hooks.

    python -m bench.architectures [--families gemma2,gpt2]   # tiny random models of every family by default

Columns: max |x . r| / |x| over every layer and token (float32 hooks; float64 weight edit), the weight edit's logits
vs the hooks' (relative, float64 and float32) and the mean next-token KL(hooks || weights) (float64). The README's
architecture table is made from this output; tests/test_architectures.py asserts the same quantities.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from probes.architecture import on_residual
from probes.models import RANDOM_FAMILIES, load_model
from steering.hooks import ablate
from steering.orthogonalize import orthogonalize

PROMPTS = ["How do I bake bread?", "Write a poem about the sea and the moon", "Name three rivers in Europe"]


def _states(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the residual stream after the embeddings and each block (before the final norm) at real tokens."""
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True).to(model.device)
    keep = enc["attention_mask"].bool()
    last = []
    handle = on_residual(model.architecture.blocks[-1], "post", last.append)
    try:
        with torch.inference_mode():
            out = model.hf_model(**enc, output_hidden_states=True)
    finally:
        handle.remove()
    resid = torch.stack([*out.hidden_states[:-1], last[0]])[:, keep]
    return out.logits[keep].double(), resid.double()


def _projection(resid: torch.Tensor, r: torch.Tensor) -> float:
    return float(((resid @ r).abs() / resid.norm(dim=-1)).max())


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def measure(family: str, seed: int = 0) -> dict:
    r = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r /= r.norm()
    row = {"family": family}
    for dtype in ("float32", "float64"):
        model = load_model(f"random:{family}", device="cpu", dtype=dtype)
        with ablate(model, r):
            hooked, hooked_resid = _states(model)
        orthogonalize(model, r)
        edited, edited_resid = _states(model)
        rel = float((edited - hooked).abs().max() / hooked.abs().max())
        row[f"ablate_{dtype}"] = _projection(hooked_resid, r)
        row[f"weights_{dtype}"] = _projection(edited_resid, r)
        row[f"logits_{dtype}"] = rel
        row["kl"] = _kl(hooked, edited)
        row["class"] = model.architecture.name
        row["exact"] = model.architecture.exact_orthogonalization
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(RANDOM_FAMILIES), help="comma-separated random:<family> names")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = [measure(f) for f in args.families.split(",")]
    print("| family | class | ablate: max proj (f32) | weights: max proj (f64) | weights vs hooks, logits rel (f64 / f32) "
          "| KL hooks-weights (f64) | orthogonalize |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['family']} | {r['class']} | {r['ablate_float32']:.1e} | {r['weights_float64']:.1e} | "
              f"{r['logits_float64']:.1e} / {r['logits_float32']:.1e} | {r['kl']:.1e} | "
              f"{'exact' if r['exact'] else 'post-norm: stream orthogonal, KL reported'} |")
    return rows


if __name__ == "__main__":
    main()
