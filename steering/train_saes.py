"""Train SAEs for a model that has none, with SAELens's trainer, and store them (float16) beside the data.

    python -m steering.train_saes --model embedded --layers 15,20                  # -> runs/sae/embedded
    python -m steering.train_saes --model embedded --layers 15,20 --out data/sae/embedded --update-shipped \\
        --overwrite                                                                  # the shipped SAEs

The SAEs of one run and its ``training.json`` are written as one folder (renamed into place when complete): an
existing folder is replaced only with ``--overwrite``, and the shipped ``data/`` folder only with ``--update-shipped``.

Corpus: :func:`steering.sae_corpus.corpus_sources` (conflict prompts, chat instructions with the model's own sampled
answers, headlines, Wikipedia passages, the model's sampled continuations of headline and passage openings; 0.36M
tokens by default, sized for a 2-core CPU; on a GPU raise the counts, e.g. ``--instructions 18000 --answered 18000
--headlines 17000 --passages 4700 --continuations 8000 --batch-size 512 --device cuda``). A held-out slice of it
gives the explained variance and the share of dead latents (all of it) and the fraction of cross-entropy loss
recovered (its first ``--ce-texts`` texts), scored on the float16 weights as stored and written into each SAE's
metadata and ``OUT/training.json``. The defaults of every SAE setting (:class:`steering.sae.SAESettings`) are those
of the shipped SAEs, from Python (:func:`steering.sae.train_sae`) as from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from probes.cli_args import check_layers, layer_list, positive_int, run_cli
from probes.files import atomic_folder, atomic_write_json, check_not_shipped
from probes.models import layer_count, load_model
from probes.settings import BatchSettings, ModelSettings, RunSettings, parse_settings, setting
from steering.sae import SAESettings, evaluate_sae, float16_copy, reconstruction_ce, save_sae, train_sae
from steering.sae_corpus import CorpusSettings, corpus_sources, mix, token_activations


@dataclass(kw_only=True)
class TrainSAEsSettings(ModelSettings, RunSettings, BatchSettings, SAESettings, CorpusSettings):
    """SAE training from corpus to stored SAEs: which layers, the corpus (:class:`CorpusSettings`), each SAE
    (:class:`SAESettings`) and its evaluation; ``batch_size``: texts per forward pass, when the model writes its
    part of the corpus and when its activations are read (e.g. 512 on a GPU)."""

    layers: list[int] | None = setting(None, "layers whose residual stream entering the block gets an SAE, e.g. "
                                             "9,15 or 9-15", parse=layer_list, required=True)
    out: Path | None = setting(None, "output folder (default: runs/sae/<model>)", parse=Path)
    max_tokens: int | None = setting(None, "cap on training tokens", parse=positive_int)
    heldout_texts: int = setting(400, "texts held out for the evaluation (explained variance, dead latents)",
                                 parse=positive_int)
    ce_texts: int = setting(150, "of the held-out texts, how many score the cross-entropy loss recovered",
                            parse=positive_int)
    update_shipped: bool = setting(False, "allow --out inside the shipped data/ folder (replacing shipped SAEs on "
                                          "purpose)")

    def output(self) -> Path:
        """The folder the run writes: ``out``, or ``runs/sae/<model>``."""
        return self.out or Path("runs") / "sae" / self.model.replace("/", "--")


def main(argv: list[str] | None = None) -> dict:
    return run(parse_settings(TrainSAEsSettings, argv, __doc__))


def run(settings: TrainSAEsSettings) -> dict:
    """Build the corpus, read the model's activations, train, evaluate and store one SAE per layer in one folder
    (refused before any work if it exists and ``settings.overwrite`` is off); the record ``training.json`` holds."""
    out = check_not_shipped(settings.output(), settings.update_shipped)
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    layers = settings.layers
    check_layers(layers, layer_count(settings.model), settings.model)
    start = time.perf_counter()
    model = load_model(settings.model, **settings.load_kwargs())
    sources = corpus_sources(model, settings, seed=settings.seed, batch_size=settings.batch_size)
    texts = mix(sources, settings.seed)
    heldout, train = texts[:settings.heldout_texts], texts[settings.heldout_texts:]
    if not train:
        raise ValueError(f"the corpus has {len(texts)} texts, no more than --heldout-texts {settings.heldout_texts}")
    acts = token_activations(model, train, layers, max_tokens=settings.max_tokens, batch_size=settings.batch_size)
    heldout_acts = token_activations(model, heldout, layers, batch_size=settings.batch_size)
    record = {"command": settings.command("steering.train_saes"), "model": model.name, "settings": settings.to_dict(),
              "corpus": {"settings": settings.part(CorpusSettings).to_dict(),
                         "texts": {k: len(v) for k, v in sources.items()}},
              "n_texts": len(train), "n_heldout_texts": len(heldout), "layers": {}}
    record["corpus_seconds"] = time.perf_counter() - start
    with atomic_folder(out, overwrite=settings.overwrite) as tmp:
        _train_layers(model, acts, heldout_acts, heldout, settings, tmp, record)
        record["seconds"] = time.perf_counter() - start
        atomic_write_json(tmp / "training.json", record)
    return record


def _train_layers(model, acts: dict, heldout_acts: dict, heldout: list[str], settings: TrainSAEsSettings,
                  tmp: Path, record: dict) -> None:
    """Train, evaluate (the float16 weights as stored) and save (into the run's temporary folder ``tmp``) one SAE
    per layer."""
    for layer in settings.layers:
        sae = train_sae(acts[layer], settings.part(SAESettings), seed=settings.seed,
                        metadata={"model_name": model.name, "hook_name": f"blocks.{layer}.hook_resid_pre",
                                  "layer": layer})  # token_activations reads the residual entering each block
        stored, ce_texts = float16_copy(sae).float(), heldout[:settings.ce_texts]
        scores = {**evaluate_sae(stored, heldout_acts[layer]),
                  **reconstruction_ce(model, stored, ce_texts), "n_ce_texts": len(ce_texts),
                  "n_train_tokens": int(acts[layer].shape[0]), "n_heldout_tokens": int(heldout_acts[layer].shape[0])}
        save_sae(sae, tmp / f"layer_{layer}", metadata={"eval": scores})
        record["layers"][layer] = scores
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    run_cli(main, kept="the SAEs are written as one folder once all are trained; nothing half-written is left")
