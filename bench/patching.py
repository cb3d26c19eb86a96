"""Activation patching (steering.patching) batched against one patch at a time: the same sites, the same hooks, the
same prompts, measured side by side in one run; prints both times, the ratio and the largest difference.

The task is indirect-object identification: clean "When Mary and John went to the store, John gave a drink to"
(answer " Mary"), corrupted with the second name swapped (answer " John"); the metric is logit(Mary) - logit(John).

    python -m bench.patching                                   # embedded on the CPU: resid_pre, every layer x token
    python -m bench.patching --kind head --batch-size 64 --device cuda
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.timing import timed
from probes.models import load_model
from steering.patching import KINDS, patch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWERS = (" Mary", " John")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kind", default="resid_pre", choices=KINDS)
    parser.add_argument("--batch-size", type=int, default=32, help="sites per forward pass of the batched run")
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    answers = tuple(model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS)
    run = partial(patch, model, CLEAN, CORRUPTED, args.kind, answers=answers, progress=False)
    run(layers=[0], positions=[-1], batch_size=1)  # warm-up: first-call costs out of both timings
    rows, results = {}, {}
    for label, size in ((f"batched, {args.batch_size} sites per pass", args.batch_size), ("one patch at a time", 1)):
        rows[label], results[label] = timed(partial(run, batch_size=size), model.device)
    (t_batched, t_single), (batched, single) = rows.values(), results.values()
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    sites = int(batched.values.isfinite().sum())
    print(f"\n{model.name} on {where}, {model.dtype}; {args.kind}: {len(batched.layers)} layers x "
          f"{batched.values.shape[1]} {'heads' if args.kind == 'head' else 'positions'} = {sites} sites")
    for label, seconds in rows.items():
        print(f"{label:40s} {seconds:8.2f} s {sites / seconds:8.1f} sites/s")
    gap = float((batched.values - single.values).abs().max())
    print(f"speed-up, batched vs one at a time: {t_single / t_batched:.2f}x (max difference {gap:.1e}; clean - "
          f"corrupted metric {batched.clean_metric - batched.corrupted_metric:.3f})")
    return rows


if __name__ == "__main__":
    main()
