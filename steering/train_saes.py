"""Train SAEs for a model that has none, with SAELens's trainer, and store them (float16) beside the data.

    python -m steering.train_saes --model embedded --layers 15,20                  # -> runs/sae/embedded
    python -m steering.train_saes --model embedded --layers 15,20 --out data/sae/embedded --update-shipped \\
        --overwrite                                                                  # the shipped SAEs

The SAEs of one run and its ``training.json`` are written as one folder (renamed into place when complete): an
existing folder is replaced only with ``--overwrite``, and the shipped ``data/`` folder only with ``--update-shipped``.

Corpus: :func:`steering.sae_corpus.corpus_sources` (conflict prompts, chat instructions with the model's own sampled
answers, headlines, Wikipedia passages, the model's sampled continuations of headline and passage openings; 0.36M
tokens by default, sized for a 2-core CPU; on a GPU raise the counts, e.g. ``--instructions 18000 --answered 18000
--headlines 17000 --passages 4700 --continuations 8000 --forward-batch 512 --device cuda``). A held-out slice of it
gives the explained variance and the share of dead latents (all of it) and the fraction of cross-entropy loss
recovered (its first ``--ce-texts`` texts), scored on the float16 weights as stored and written into each SAE's
metadata and ``OUT/training.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from probes.cli_args import add_placement_args, parse_layers, placement
from probes.cli_args import (ArgumentParser, UsageError, check_layers, non_negative_float, non_negative_int,
                             positive_float, positive_int, run_cli)
from probes.files import atomic_folder, atomic_write_json, check_not_shipped
from probes.models import layer_count, load_model
from steering.sae import evaluate_sae, float16_copy, reconstruction_ce, save_sae, train_sae
from steering.sae_corpus import CorpusSettings, corpus_sources, mix, token_activations


def _parser() -> ArgumentParser:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layers", required=True, help="e.g. 9,15 or 9-15")
    parser.add_argument("--d-sae", type=positive_int, default=4096)
    parser.add_argument("--architecture", choices=("standard", "topk"), default="topk")
    parser.add_argument("--k", type=positive_int, default=32, help="active latents per token (topk)")
    parser.add_argument("--l1", type=non_negative_float, default=5.0, help="L1 coefficient (standard)")
    parser.add_argument("--aux", type=non_negative_float, default=1.0,
                        help="weight of the AuxK loss that revives dead latents (topk; 0 turns it off)")
    parser.add_argument("--dead-window", type=positive_int, default=200_000,
                        help="training tokens without firing after which a latent counts as dead")
    parser.add_argument("--epochs", type=positive_float, default=5.0)
    parser.add_argument("--batch-size", type=positive_int, default=1024, help="tokens per SAE training step")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="cap on training tokens")
    parser.add_argument("--heldout-texts", type=positive_int, default=400,
                        help="texts held out for the evaluation (explained variance, dead latents)")
    parser.add_argument("--ce-texts", type=positive_int, default=150,
                        help="of the held-out texts, how many score the cross-entropy loss recovered")
    defaults = CorpusSettings()
    for name in ("conflict_facts", "instructions", "answered", "headlines", "passages"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=non_negative_int, default=getattr(defaults, name),
                            help=f"corpus: {name.replace('_', ' ')} (default: {getattr(defaults, name) or 'all'})")
    parser.add_argument("--continuations", type=non_negative_int, default=defaults.continuations,
                        help="corpus: headline and passage openings continued by the model")
    parser.add_argument("--forward-batch", type=positive_int, default=32,
                        help="texts per model batch, when the model writes its part of the corpus and when its "
                             "activations are read (e.g. 512 on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_placement_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/sae/<model>")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--update-shipped", action="store_true",
                        help="allow --out inside the shipped data/ folder (replacing shipped SAEs on purpose)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    out = check_not_shipped(args.out or Path("runs") / "sae" / args.model.replace("/", "--"), args.update_shipped)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    layers = parse_layers(args.layers)
    check_layers(layers, layer_count(args.model), args.model)
    if args.architecture == "topk" and args.k > args.d_sae:
        raise UsageError(f"--k {args.k} is more than --d-sae {args.d_sae} latents; choose k <= d_sae")
    settings = CorpusSettings(conflict_facts=args.conflict_facts, instructions=args.instructions,
                              answered=args.answered, headlines=args.headlines, passages=args.passages,
                              continuations=args.continuations)
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, **placement(args))
    sources = corpus_sources(model, settings, seed=args.seed, batch_size=args.forward_batch)
    texts = mix(sources, args.seed)
    heldout, train = texts[:args.heldout_texts], texts[args.heldout_texts:]
    if not train:
        raise UsageError(f"the corpus has {len(texts)} texts, no more than --heldout-texts {args.heldout_texts}")
    acts = token_activations(model, train, layers, max_tokens=args.max_tokens, batch_size=args.forward_batch)
    heldout_acts = token_activations(model, heldout, layers, batch_size=args.forward_batch)
    record = {"command": " ".join(["python -m steering.train_saes", *(argv if argv is not None else sys.argv[1:])]),
              "model": model.name, "corpus": {"settings": asdict(settings), "texts": {k: len(v) for k, v in
                                                                                       sources.items()}},
              "n_texts": len(train), "n_heldout_texts": len(heldout), "layers": {}}
    record["corpus_seconds"] = time.perf_counter() - start
    with atomic_folder(out, overwrite=args.overwrite) as tmp:
        _train_layers(model, layers, acts, heldout_acts, heldout, args, tmp, record)
        record["seconds"] = time.perf_counter() - start
        atomic_write_json(tmp / "training.json", record)
    return record


def _train_layers(model, layers: list[int], acts: dict, heldout_acts: dict, heldout: list[str], args, tmp: Path,
                  record: dict) -> None:
    """Train, evaluate (the float16 weights as stored) and save (into the run's temporary folder ``tmp``) one SAE
    per layer."""
    for layer in layers:
        sae = train_sae(acts[layer], args.d_sae, args.l1, architecture=args.architecture, k=args.k,
                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, aux_coefficient=args.aux,
                        dead_window_tokens=args.dead_window, seed=args.seed,
                        metadata={"model_name": model.name, "hook_name": f"blocks.{layer}.hook_resid_pre",
                                  "layer": layer})  # token_activations reads the residual entering each block
        stored, ce_texts = float16_copy(sae).float(), heldout[:args.ce_texts]
        scores = {**evaluate_sae(stored, heldout_acts[layer]),
                  **reconstruction_ce(model, stored, ce_texts), "n_ce_texts": len(ce_texts),
                  "n_train_tokens": int(acts[layer].shape[0]), "n_heldout_tokens": int(heldout_acts[layer].shape[0])}
        save_sae(sae, tmp / f"layer_{layer}", metadata={"eval": scores})
        record["layers"][layer] = scores
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    run_cli(main)
