"""Gurnee & Tegmark (2023), "Language Models Represent Space and Time": linear probes for place and date, by layer.

    python -m probes.space_time --model embedded \
        --datasets world_place,us_place,nyc_place,art,historical_figure,headline --n 3000 --out runs/space_time

For each dataset: activations at the last token of the entity under each prompt template, one ridge probe per layer
fitted on the train split and scored on the test split (R², Spearman), then held-out blocks (a country, state,
borough, art type, category or decade unseen in training), and the single "space/time neurons" of the MLP. Controls
(``--no-controls`` skips them): the same probe on a random-weights twin of the model and on shuffled targets.
Writes ``OUT/results.json``, HTML figures and the report page ``OUT/index.html``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from probes.cache import extract, residual_hooks
from probes.cli_args import ArgumentParser, add_placement_args, placement, positive_int, run_cli
from probes.datasets import EntityData, load_entities
from probes.errors import WorkbenchError, as_list
from probes.files import atomic_write_json, prepare_run_folder
from probes.linear import DEFAULT_ALPHAS, RidgeProbe
from probes.metrics import bootstrap_r2, haversine_km, proximity_error, r2_score, spearman
from probes.models import ModelHandle, load_model, random_twin
from probes.positions import mark_span
from probes.provenance import weights_fingerprint
from probes.report import interval

ALL_DATASETS = ("world_place", "us_place", "nyc_place", "art", "historical_figure", "headline")

# Prompt templates per dataset: the empty prompt and a descriptive question, as in the paper's robustness study.
TEMPLATES: dict[str, dict[str, str]] = {
    "world_place": {"empty": "{entity}", "question": "What is the location of {entity}?"},
    "us_place": {"empty": "{entity}", "question": "What is the location of {entity}?"},
    "nyc_place": {"empty": "{entity}", "question": "Where in New York City is {entity}?"},
    "art": {"empty": "{entity}", "question": "What is the release date of {entity}?"},
    "historical_figure": {"empty": "{entity}", "question": "In what year did {entity} die?"},
    "headline": {"empty": "{entity}", "question": "When was the news headline \"{entity}\" published?"},
}

# Column whose values are held out one at a time for the generalisation test.
BLOCK_COLUMNS = {"world_place": "country", "us_place": "state_name", "nyc_place": "borough_name",
                 "art": "entity_type", "historical_figure": "category", "headline": "decade"}

@dataclass
class ProbeResult:
    """One dataset under one template: per-layer test scores and the best layer's test predictions; ``peak``: the
    best layer with its test R² and 95% bootstrap interval over the test entities (:func:`bootstrap_r2`)."""

    dataset: str
    template: str
    layers: list[int]
    r2: list[float]
    spearman: list[float]
    alphas: list[float]
    best_layer: int
    best_r2: float
    predictions: np.ndarray
    truth: np.ndarray
    peak: dict
    extra: dict = field(default_factory=dict)


def entity_activations(model: ModelHandle, data: EntityData, template: str, dtype: torch.dtype = torch.float32,
                       hooks: Sequence[str] | None = None, progress: bool = True) -> torch.Tensor:
    """Residual stream at the last token of each entity: [n, n_layers + 1, d] on the model's device."""
    marked = [mark_span(template, e) for e in data.entities]
    cache = extract(model, [p for p, _ in marked], hooks=hooks or residual_hooks(model), positions="span_last",
                    spans=[s for _, s in marked], dtype=dtype, progress=progress)
    return cache.acts


def _targets(data: EntityData, device) -> torch.Tensor:
    return torch.tensor(data.targets, dtype=torch.float64, device=device)


def fit_layers(acts: torch.Tensor, data: EntityData, alphas: Sequence[float] = DEFAULT_ALPHAS,
               template: str = "empty") -> ProbeResult:
    """A ridge probe per layer on the train split; R² and Spearman on the test split, and the best layer's R² with
    its 95% bootstrap interval."""
    y = _targets(data, acts.device)
    train = torch.as_tensor(~data.is_test, device=acts.device)
    test = ~train
    probe = RidgeProbe(alphas=alphas).fit(acts[train], y[train])
    pred = probe.predict(acts[test])  # [layers, n_test, targets]
    truth = y[test]
    r2 = [r2_score(truth, p) for p in pred]
    rho = [float(np.mean([spearman(truth[:, t], p[:, t]) for t in range(truth.shape[1])])) for p in pred]
    best = int(np.argmax(r2))
    return ProbeResult(data.name, template, list(range(acts.shape[1])), r2, rho,
                       [float(a) for a in probe.alpha_], best, r2[best], pred[best].cpu().numpy(),
                       truth.cpu().numpy(), {"layer": best, **bootstrap_r2(truth, pred[best])})


def place_errors(result: ProbeResult) -> dict:
    """Median great-circle error (km) and mean proximity error of the best layer's predictions of places."""
    pred, true = torch.as_tensor(result.predictions), torch.as_tensor(result.truth)
    km = haversine_km(true[:, 0], true[:, 1], pred[:, 0], pred[:, 1])
    return {"median_error_km": float(km.median()), "proximity_error": float(proximity_error(pred, true).mean())}


def heldout_blocks(acts_layer: torch.Tensor, data: EntityData, column: str, n_blocks: int = 5,
                   alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[dict]:
    """Train without one block (e.g. a country), test on it; compare with a probe that saw the block in training.

    ``acts_layer`` is one layer's activations [n, d]. Both probes are scored on the same test rows of the block.
    """
    frame = data.frame
    if column not in frame:
        raise ValueError(f"dataset {data.name} has no column {column!r} to hold out; columns: {list(frame.columns)}")
    y = _targets(data, acts_layer.device)
    is_test = torch.as_tensor(data.is_test, device=acts_layer.device)
    blocks = frame[column].astype(str).value_counts().index[:n_blocks]
    full = RidgeProbe(alphas=alphas).fit(acts_layer[~is_test], y[~is_test])
    rows = []
    for block in blocks:
        in_block = torch.as_tensor((frame[column].astype(str) == block).to_numpy(), device=acts_layer.device)
        test_rows = in_block & is_test
        if int(test_rows.sum()) < 5:
            continue
        held = RidgeProbe(alphas=alphas).fit(acts_layer[~is_test & ~in_block], y[~is_test & ~in_block])
        truth = y[test_rows]
        rows.append({"block": block, "n_test": int(test_rows.sum()),
                     "r2_heldout": r2_score(truth, held.predict(acts_layer[test_rows])),
                     "r2_seen": r2_score(truth, full.predict(acts_layer[test_rows])),
                     "proximity_error_heldout": float(proximity_error(held.predict(acts_layer[test_rows]),
                                                                      truth).mean()),
                     "proximity_error_seen": float(proximity_error(full.predict(acts_layer[test_rows]),
                                                                   truth).mean())})
    return rows


def neuron_analysis(neurons: torch.Tensor, data: EntityData, ks: Sequence[int] = (1, 4, 16, 64),
                    alphas: Sequence[float] = DEFAULT_ALPHAS) -> dict:
    """Single MLP neurons most correlated with each target, and probes restricted to the top-k neurons.

    ``neurons`` [n, n_neurons] at one layer. Neurons are ranked on the train split only.
    """
    y = _targets(data, neurons.device)
    train = torch.as_tensor(~data.is_test, device=neurons.device)
    x = neurons.double()
    xc = x[train] - x[train].mean(0)
    yc = y[train] - y[train].mean(0)
    corr = (xc.T @ yc) / (xc.norm(dim=0)[:, None] * yc.norm(dim=0)[None, :]).clamp(min=1e-12)  # [neurons, t]
    score = corr.abs().max(dim=1).values
    order = torch.argsort(score, descending=True)
    top = {name: {"neuron": int(torch.argmax(corr[:, t].abs())), "correlation": float(corr[:, t].abs().max())}
           for t, name in enumerate(data.target_names)}
    test = ~train
    topk = {}
    for k in [k for k in ks if k <= x.shape[1]] + [x.shape[1]]:
        cols = order[:k]
        probe = RidgeProbe(alphas=alphas).fit(neurons[train][:, cols], y[train])
        topk[str(k)] = r2_score(y[test], probe.predict(neurons[test][:, cols]))
    return {"top_neurons": top, "r2_top_k": topk}


def shuffled_targets(data: EntityData, seed: int = 0) -> EntityData:
    """``data`` with its target rows permuted across entities (seeded; train and test keep their rows), so a probe
    can only fit noise: the control for the probe's own capacity."""
    order = np.random.default_rng(seed).permutation(len(data))
    return dataclasses.replace(data, targets=data.targets[order])


def control_curves(twin: ModelHandle, acts: torch.Tensor, data: EntityData, template: str,
                   alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0, progress: bool = True
                   ) -> dict[str, ProbeResult]:
    """The same probe on the random-weights ``twin``'s activations and on ``acts`` (the probed model's) with
    shuffled targets: test R² by layer and the peak's interval of each control, by control name."""
    twin_acts = entity_activations(twin, data, template, progress=progress)
    return {"random_weights": fit_layers(twin_acts, data, alphas, template),
            "shuffled_targets": fit_layers(acts, shuffled_targets(data, seed), alphas, template)}


def sklearn_reference_r2(acts_layer: torch.Tensor, data: EntityData, alphas: Sequence[float]) -> float:
    """R² of scikit-learn's RidgeCV on the same layer and split (standardised targets), as a cross-check."""
    from sklearn.linear_model import RidgeCV

    x = acts_layer.double().cpu().numpy()
    y = np.asarray(data.targets, dtype=np.float64)
    train = ~np.asarray(data.is_test)
    mu, sd = y[train].mean(0), y[train].std(0)
    model = RidgeCV(alphas=list(alphas)).fit(x[train], (y[train] - mu) / sd)
    pred = model.predict(x[~train]).reshape(-1, y.shape[1]) * sd + mu
    return r2_score(torch.as_tensor(y[~train]), torch.as_tensor(pred))


def check_choices(datasets: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse unknown dataset or template names (before any model loads, on the command line)."""
    datasets, templates = as_list(datasets, "datasets"), as_list(templates, "templates")
    unknown = [d for d in datasets if d not in TEMPLATES]
    if unknown or not datasets:
        raise WorkbenchError(f"unknown dataset(s) {unknown or datasets}; choose from {list(TEMPLATES)}")
    bad = [t for t in templates if t not in TEMPLATES[datasets[0]]]
    if not templates or bad:
        raise WorkbenchError(f"unknown template(s) {bad or templates}; choose from {list(TEMPLATES[datasets[0]])}")


def reproduce(model: ModelHandle, datasets: Sequence[str], n: int | None,
              templates: Sequence[str] = ("empty", "question"), alphas: Sequence[float] = DEFAULT_ALPHAS,
              n_blocks: int = 5, neuron_ks: Sequence[int] = (1, 4, 16, 64), seed: int = 0,
              progress: bool = True, on_dataset: Callable[[dict], None] | None = None, controls: bool = True
              ) -> tuple[dict, dict[str, dict[str, ProbeResult]]]:
    """The whole reproduction: the results dict (DESIGN.md contract plus details) and every probe run by dataset.

    ``on_dataset(results)`` is called after each dataset with the results so far (to save partial progress).
    ``controls`` adds ``results["controls"][dataset]``: test R² by layer (first template) of the same probe on a
    random-weights twin of the model and on shuffled targets (:func:`control_curves`), and
    ``results["control_peaks"][dataset]``: each control's peak, as the dataset's own ``peak`` entry (the best layer,
    its test R², 95% bootstrap interval over the test entities and n).
    """
    check_choices(datasets, templates)
    results: dict = {"model": model.name, "n": n, "templates": list(templates), "datasets": {}}
    twin = random_twin(model, seed) if controls else None
    if twin is not None:
        results["controls"], results["control_peaks"] = {}, {}
        results["control_model"] = {"name": twin.name, "seed": seed,
                                    "weights_fingerprint": weights_fingerprint(twin)}
    runs_by_dataset: dict[str, dict[str, ProbeResult]] = {}
    for name in datasets:
        start = time.perf_counter()
        data = load_entities(name, n=n, seed=seed)
        runs, acts_main = {}, None
        for template in templates:
            acts = entity_activations(model, data, TEMPLATES[name][template], progress=progress)
            runs[template] = fit_layers(acts, data, alphas, template)
            if acts_main is None:
                acts_main = acts
        main = runs[templates[0]]
        best = main.best_layer
        entry = {"targets": list(data.target_names), "layers": main.layers, "r2": main.r2, "spearman": main.spearman,
                 "best_layer": best, "best_r2": main.best_r2, "n_train": int((~data.is_test).sum()),
                 "n_test": int(data.is_test.sum()), "alphas": main.alphas, "peak": main.peak,
                 "sklearn_ridgecv_r2_at_best_layer": sklearn_reference_r2(acts_main[:, best], data, alphas),
                 "templates": {t: {"r2": r.r2, "best_layer": r.best_layer, "best_r2": r.best_r2}
                               for t, r in runs.items()}}
        if data.kind == "space":
            entry.update(place_errors(main))
        entry["heldout_blocks"] = heldout_blocks(acts_main[:, best], data, BLOCK_COLUMNS[name], n_blocks, alphas)
        neuron_layer = max(0, min(best, model.n_layers) - 1)  # MLP of the block feeding the best residual layer
        neurons = entity_activations(model, data, TEMPLATES[name][templates[0]],
                                     hooks=[f"blocks.{neuron_layer}.mlp.hook_post"], progress=progress)[:, 0]
        entry["neurons"] = {"layer": neuron_layer, **neuron_analysis(neurons, data, neuron_ks, alphas)}
        if twin is not None:
            fits = control_curves(twin, acts_main, data, TEMPLATES[name][templates[0]], alphas, seed, progress)
            results["controls"][name] = {control: fit.r2 for control, fit in fits.items()}
            results["control_peaks"][name] = {control: fit.peak for control, fit in fits.items()}
        entry["seconds"] = time.perf_counter() - start
        results["datasets"][name] = entry
        runs_by_dataset[name] = runs
        del acts_main
        if on_dataset is not None:
            on_dataset(results)
    return results, runs_by_dataset


def run_outputs() -> tuple[str, ...]:
    """What a run writes in its folder: the whole set is replaced by the next run (with overwrite)."""
    from probes.space_time_plots import FIGURE_FILES

    return ("results.json", "plotly.min.js", *FIGURE_FILES)


def run(model: ModelHandle, datasets: Sequence[str], n: int | None, out: Path, overwrite: bool = False,
        **kwargs) -> dict:
    """:func:`reproduce`, then ``OUT/results.json`` and the HTML figures.

    ``results.json`` is rewritten after each dataset with ``"complete": false`` until the whole run has finished.
    A folder holding a previous run's outputs is refused unless ``overwrite``, which removes them first.
    """
    from probes import space_time_plots as plots

    prepare_run_folder(out, run_outputs(), overwrite)

    def save(partial: dict) -> None:
        atomic_write_json(out / "results.json", partial)

    results, runs = reproduce(model, datasets, n, on_dataset=lambda r: save({**r, "complete": False}), **kwargs)
    results["complete"] = True
    save(results)
    plots.write_all(results, runs, out)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--datasets", default=",".join(ALL_DATASETS))
    parser.add_argument("--n", type=positive_int, default=3000, help="entities per dataset (most popular first)")
    parser.add_argument("--templates", default="empty,question")
    parser.add_argument("--device", default=None)
    add_placement_args(parser)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    parser.add_argument("--no-controls", dest="controls", action="store_false",
                        help="skip the random-weights and shuffled-targets controls (faster)")
    args = parser.parse_args(argv)
    check_choices(args.datasets.split(","), args.templates.split(","))
    prepare_run_folder(args.out, run_outputs(), args.overwrite)  # refused before the model loads
    model = load_model(args.model, device=args.device, dtype=args.dtype, **placement(args))
    results = run(model, args.datasets.split(","), args.n, args.out, templates=args.templates.split(","),
                  overwrite=args.overwrite, controls=args.controls)
    for name, entry in results["datasets"].items():
        print(f"{name:18s} best layer {entry['best_layer']:2d}  R² {entry['best_r2']:.3f} {interval(entry['peak'])}  "
              f"(sklearn RidgeCV at that layer {entry['sklearn_ridgecv_r2_at_best_layer']:.3f})")
        for control, peak in results.get("control_peaks", {}).get(name, {}).items():
            print(f"{'':18s} {control:16s} peak R² {peak['r2']:.3f} {interval(peak)}")
    print(f"wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main)
