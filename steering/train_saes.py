"""Train SAEs for a model that has none, with SAELens's trainer, and store them (float16) beside the data.

    python -m steering.train_saes --model embedded --layers 9,15 --d-sae 4096 --out data/sae/embedded

Corpus: :func:`steering.sae_corpus.corpus` (conflict prompts, chat instructions with some of the model's own answers,
headlines). A held-out slice of it gives the explained variance and the fraction of cross-entropy loss recovered,
stored in each SAE's metadata and in ``OUT/training.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from probes.cli_args import add_placement_args, parse_layers, placement
from probes.cli_args import (ArgumentParser, UsageError, check_layers, non_negative_float, positive_float,
                             positive_int, run_cli)
from probes.models import layer_count, load_model
from steering.sae import SAE_DIR, evaluate_sae, reconstruction_ce, save_sae, train_sae
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
    parser.add_argument("--out", type=Path, default=None, help="default: data/sae/<model>")
    args = parser.parse_args(argv)
    layers = parse_layers(args.layers)
    check_layers(layers, layer_count(args.model), args.model)
    if args.architecture == "topk" and args.k > args.d_sae:
        raise UsageError(f"--k {args.k} is more than --d-sae {args.d_sae} latents; choose k <= d_sae")
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, **placement(args))
    out = args.out or SAE_DIR / model.name.replace("/", "--")
    texts = corpus(model, seed=args.seed)
    heldout, train = texts[:args.heldout_texts], texts[args.heldout_texts:]
    acts = token_activations(model, train, layers, max_tokens=args.max_tokens)
    heldout_acts = token_activations(model, heldout, layers)
    record = {"command": " ".join(["python -m steering.train_saes", *(argv if argv is not None else sys.argv[1:])]),
              "n_texts": len(train), "n_heldout_texts": len(heldout), "layers": {}}
    for layer in layers:
        sae = train_sae(acts[layer], args.d_sae, args.l1, architecture=args.architecture, k=args.k,
                        epochs=args.epochs, seed=args.seed,
                        metadata={"model_name": model.name, "hook_name": f"blocks.{layer}.hook_resid_pre",
                                  "layer": layer})  # token_activations reads the residual entering each block
        scores = {**evaluate_sae(sae, heldout_acts[layer]), **reconstruction_ce(model, sae, heldout),
                  "n_train_tokens": int(acts[layer].shape[0]), "n_heldout_tokens": int(heldout_acts[layer].shape[0])}
        save_sae(sae, out / f"layer_{layer}", metadata={"eval": scores}, overwrite=True)
        record["layers"][layer] = scores
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)
    record["seconds"] = time.perf_counter() - start
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    run_cli(main)
