"""Timing of the refusal pipeline's steps: directions, candidate selection (batched vs one prompt at a time),
orthogonalization + save.

    python -m bench.refusal                                  # embedded-refuser on the CPU, small sizes
    python -m bench.refusal --model random:llama-1b --device cuda --n-train 256 --n-val 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import steering  # noqa: F401  (registers embedded-refuser)
from probes.datasets import load_refusal_instructions
from probes.models import load_model
from steering.directions import diff_in_means
from steering.orthogonalize import orthogonalize, save_checkpoint
from steering.refusal import score_candidates


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-refuser")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--layer-step", type=int, default=6)
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    harmful = {s: load_refusal_instructions(s, "harmful") for s in ("train", "val")}
    harmless = {s: load_refusal_instructions(s, "harmless") for s in ("train", "val")}
    layers = list(range(0, model.n_layers, args.layer_step))
    t_dirs, candidates = _timed(lambda: diff_in_means(model, harmful["train"][:args.n_train],
                                                      harmless["train"][:args.n_train], layers=layers,
                                                      progress=False), model.device)
    rows = {"directions (diff in means, %d+%d prompts)" % (args.n_train, args.n_train): t_dirs}
    for batch in (args.n_val, 1):
        t, scores = _timed(lambda: score_candidates(model, candidates, harmful["val"][:args.n_val],
                                                    harmless["val"][:args.n_val], batch_size=batch,
                                                    progress=False), model.device)
        rows[f"selection, {len(scores)} candidates, prompts in batches of {batch}"] = t
    best = min(scores, key=lambda s: s.ablation_refusal)
    direction = candidates.get(best.position, best.layer).float()
    with tempfile.TemporaryDirectory() as tmp:
        t, _ = _timed(lambda: save_checkpoint(orthogonalize(model, direction), Path(tmp) / "ckpt", direction,
                                              best.layer, best.position), model.device)
    rows["orthogonalize + save checkpoint"] = t
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    print(f"\n{model.name} on {where}, {model.dtype}; {args.n_val} validation prompts per group")
    for name, seconds in rows.items():
        print(f"{name:60s} {seconds:8.2f} s")
    keys = list(rows)
    print(f"ratio one-at-a-time / batched selection: {rows[keys[2]] / rows[keys[1]]:.1f}x")
    return rows


if __name__ == "__main__":
    main()
