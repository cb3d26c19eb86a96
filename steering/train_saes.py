"""Train SAEs for a model that has none, with SAELens's trainer, and store them (float16) beside the data.

    python -m steering.train_saes --model embedded --layers 9,15 --d-sae 4096            # -> runs/sae/embedded
    python -m steering.train_saes --model embedded --layers 15,20 --out data/sae/embedded --update-shipped --overwrite

The SAEs of one run and its ``training.json`` are written as one folder (renamed into place when complete): an
existing folder is replaced only with ``--overwrite``, and the shipped ``data/`` folder only with ``--update-shipped``.

Corpus: :func:`steering.sae_corpus.corpus` (conflict prompts, chat instructions with some of the model's own answers,
headlines). A held-out slice of it gives the explained variance and the fraction of cross-entropy loss recovered,
stored in each SAE's metadata and in ``OUT/training.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from probes.cli_args import add_placement_args, parse_layers, placement
from probes.cli_args import (ArgumentParser, UsageError, check_layers, non_negative_float, positive_float,
                             positive_int, run_cli)
from probes.files import atomic_folder, atomic_write_json, check_not_shipped
from probes.models import layer_count, load_model
from steering.sae import evaluate_sae, reconstruction_ce, save_sae, train_sae
from steering.sae_corpus import corpus, token_activations


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layers", required=True, help="e.g. 9,15 or 9-15")
    parser.add_argument("--d-sae", type=positive_int, default=4096)
    parser.add_argument("--architecture", choices=("standard", "topk"), default="topk")
    parser.add_argument("--k", type=positive_int, default=32, help="active latents per token (topk)")
    parser.add_argument("--l1", type=non_negative_float, default=5.0, help="L1 coefficient (standard)")
    parser.add_argument("--epochs", type=positive_float, default=8.0)
    parser.add_argument("--max-tokens", type=positive_int, default=300_000)
    parser.add_argument("--heldout-texts", type=positive_int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_placement_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/sae/<model>")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--update-shipped", action="store_true",
                        help="allow --out inside the shipped data/ folder (replacing shipped SAEs on purpose)")
    args = parser.parse_args(argv)
    out = check_not_shipped(args.out or Path("runs") / "sae" / args.model.replace("/", "--"), args.update_shipped)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    layers = parse_layers(args.layers)
    check_layers(layers, layer_count(args.model), args.model)
    if args.architecture == "topk" and args.k > args.d_sae:
        raise UsageError(f"--k {args.k} is more than --d-sae {args.d_sae} latents; choose k <= d_sae")
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, **placement(args))
    texts = corpus(model, seed=args.seed)
    heldout, train = texts[:args.heldout_texts], texts[args.heldout_texts:]
    acts = token_activations(model, train, layers, max_tokens=args.max_tokens)
    heldout_acts = token_activations(model, heldout, layers)
    record = {"command": " ".join(["python -m steering.train_saes", *(argv if argv is not None else sys.argv[1:])]),
              "model": model.name, "n_texts": len(train), "n_heldout_texts": len(heldout), "layers": {}}
    with atomic_folder(out, overwrite=args.overwrite) as tmp:
        _train_layers(model, layers, acts, heldout_acts, heldout, args, tmp, record)
        record["seconds"] = time.perf_counter() - start
        atomic_write_json(tmp / "training.json", record)
    return record


def _train_layers(model, layers: list[int], acts: dict, heldout_acts: dict, heldout: list[str], args, tmp: Path,
                  record: dict) -> None:
    """Train, evaluate and save (into the run's temporary folder ``tmp``) one SAE per layer."""
    for layer in layers:
        sae = train_sae(acts[layer], args.d_sae, args.l1, architecture=args.architecture, k=args.k,
                        epochs=args.epochs, seed=args.seed,
                        metadata={"model_name": model.name, "hook_name": f"blocks.{layer}.hook_resid_pre",
                                  "layer": layer})  # token_activations reads the residual entering each block
        scores = {**evaluate_sae(sae, heldout_acts[layer]), **reconstruction_ce(model, sae, heldout),
                  "n_train_tokens": int(acts[layer].shape[0]), "n_heldout_tokens": int(heldout_acts[layer].shape[0])}
        save_sae(sae, tmp / f"layer_{layer}", metadata={"eval": scores})
        record["layers"][layer] = scores
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    run_cli(main)
