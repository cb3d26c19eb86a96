"""Timing of the refusal pipeline's steps (steering.refusal): the candidate directions, their selection (many
candidates per forward pass vs one candidate at a time, same rows per pass), and the edit (orthogonalize, compared
with the hooks) + save of the checkpoint.

    python -m bench.refusal                                  # embedded-refuser on the CPU, small sizes
    python -m bench.refusal --model random:llama-1b --device cuda --dtype bfloat16 --n-train 256 --n-val 32
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch

from bench.timing import timed
from probes.models import ModelHandle, load_model
from steering import refusal
from steering.orthogonalize import save_checkpoint


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-refuser")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=8, help="held-out prompts of each kind the edit is checked on")
    parser.add_argument("--layer-step", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward pass in both selection modes")
    parser.add_argument("--outlier-ratio", type=float, default=0.0,
                        help="as the pipeline's --outlier-ratio; 0 (the default here): the plain difference in means "
                             "that bench/README.md timed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        settings = refusal.RefusalSettings(model=args.model, device=args.device, dtype=args.dtype, out=Path(tmp),
                                           n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                           layer_step=args.layer_step, batch_size=args.batch_size,
                                           outlier_ratio=args.outlier_ratio)
        model = load_model(settings.model, **settings.load_kwargs())
        rows, gap = time_steps(model, settings)
    where = torch.cuda.get_device_name() if model.device.type == "cuda" else "CPU"
    print(f"\n{model.name} on {where}, {model.dtype}; {args.n_val} validation prompts per group, "
          f"{args.batch_size} rows per pass")
    for name, seconds in rows.items():
        print(f"{name:70s} {seconds:8.2f} s")
    keys = list(rows)
    print(f"selection speed-up, many per pass vs one at a time: {rows[keys[2]] / rows[keys[1]]:.2f}x "
          f"(max score difference {gap:.1e})")
    return rows


def time_steps(model: ModelHandle, settings: refusal.RefusalSettings) -> tuple[dict[str, float], float]:
    """Seconds of each step (uncached), and the largest difference between the two selection modes' scores."""
    prompts = refusal.instructions(settings)
    t, candidates = timed(lambda: refusal.candidate_directions(model, settings, prompts, progress=False), model.device)
    rows = {f"directions (diff in means, {settings.n_train}+{settings.n_train} prompts, "
            f"{len(candidates.layers)} layers)": t}
    scores = {}
    for mix, label in ((True, "many candidates per pass"), (False, "one candidate at a time")):
        # the selection step's scorer, in each mode
        score = partial(refusal.score_candidates, model, candidates, prompts["harmful_val"], prompts["harmless_val"],
                        batch_size=settings.batch_size, mix_candidates=mix, progress=False)
        t, scores[mix] = timed(score, model.device)
        rows[f"selection, {len(scores[mix])} candidates, {label}"] = t
    gap = max(abs(a.ablation_refusal - b.ablation_refusal) for a, b in zip(scores[True], scores[False], strict=True))
    selected = refusal.selected_direction(model, candidates, refusal.select(scores[True]))

    def edit_and_save() -> Path:
        refusal.edit(model, settings, prompts, selected)
        return save_checkpoint(model, settings.out / "ckpt", selected.vector, selected.layer, selected.position)

    rows["edit (orthogonalize, checked against the hooks) + save checkpoint"] = timed(edit_and_save, model.device)[0]
    return rows, gap


if __name__ == "__main__":
    main()
