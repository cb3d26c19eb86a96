"""Timing of the refusal pipeline's steps: direction generation, candidate selection (many candidates per forward
pass vs one candidate at a time, same rows per pass), orthogonalization + save.

    python -m bench.refusal                                  # embedded-refuser on the CPU, small sizes
    python -m bench.refusal --model random:llama-1b --device cuda --dtype bfloat16 --n-train 256 --n-val 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.timing import timed
from probes.datasets import load_refusal_instructions
from probes.models import load_model
from steering.directions import diff_in_means
from steering.orthogonalize import orthogonalize, save_checkpoint
from steering.refusal import score_candidates, select


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-refuser")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--layer-step", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward pass in both selection modes")
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    data = {(kind, split): load_refusal_instructions(split, kind)
            for kind in ("harmful", "harmless") for split in ("train", "val")}
    layers = list(range(0, model.n_layers, args.layer_step))
    t, candidates = timed(lambda: diff_in_means(model, data["harmful", "train"][:args.n_train],
                                                 data["harmless", "train"][:args.n_train], layers=layers,
                                                 progress=False), model.device)
    rows = {f"directions (diff in means, {args.n_train}+{args.n_train} prompts, {len(layers)} layers)": t}
    scores = {}
    for mix, label in ((True, "many candidates per pass"), (False, "one candidate at a time")):
        t, scores[mix] = timed(lambda: score_candidates(model, candidates, data["harmful", "val"][:args.n_val],
                                                         data["harmless", "val"][:args.n_val],
                                                         batch_size=args.batch_size, mix_candidates=mix,
                                                         progress=False), model.device)
        rows[f"selection, {len(scores[mix])} candidates, {label}"] = t
    gap = max(abs(a.ablation_refusal - b.ablation_refusal) for a, b in zip(scores[True], scores[False]))
    best = select(scores[True])
    direction = candidates.get(best.position, best.layer).float()
    with tempfile.TemporaryDirectory() as tmp:
        t, _ = timed(lambda: save_checkpoint(orthogonalize(model, direction), Path(tmp) / "ckpt", direction,
                                              best.layer, best.position), model.device)
    rows["orthogonalize + save checkpoint"] = t
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    print(f"\n{model.name} on {where}, {model.dtype}; {args.n_val} validation prompts per group, "
          f"{args.batch_size} rows per pass")
    for name, seconds in rows.items():
        print(f"{name:70s} {seconds:8.2f} s")
    keys = list(rows)
    print(f"selection speed-up, many per pass vs one at a time: {rows[keys[2]] / rows[keys[1]]:.2f}x "
          f"(max score difference {gap:.1e})")
    return rows


if __name__ == "__main__":
    main()
