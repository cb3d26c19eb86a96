"""Gurnee & Tegmark (2023), "Language Models Represent Space and Time": linear probes for place and date, by layer.

    python -m probes.space_time --model embedded \
        --datasets world_place,us_place,nyc_place,art,historical_figure,headline --n-entities 3000 \
        --out runs/space_time

For each dataset: activations at the last token of the entity under each prompt template, one ridge probe per layer
fitted on the train split and scored on the test split (R², Spearman), then held-out blocks (a country, state,
borough, art type, category or decade unseen in training), and the single "space/time neurons" of the MLP. Controls
(``--no-controls`` skips them): the same probe on a random-weights twin of the model and on shuffled targets.
Writes ``OUT/results.json``, HTML figures and the report page ``OUT/index.html``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from probes import space_time_analyses as analyses
from probes.cache import extract, residual_hooks
from probes.cli_args import name_list, positive_int, positive_int_list, run_cli
from probes.datasets import EntityData, load_entities
from probes.errors import WorkbenchError, as_list
from probes.files import atomic_write_json, prepare_run_folder
from probes.linear import DEFAULT_ALPHAS, RidgeProbe
from probes.metrics import bootstrap_r2, haversine_km, proximity_error, r2_score, spearman
from probes.models import ModelHandle, load_model
from probes.positions import mark_span
from probes.provenance import weights_fingerprint
from probes.random_models import random_twin
from probes.report import interval
from probes.settings import ModelSettings, RunSettings, parse_settings, setting

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
        in_block = torch.tensor((frame[column].astype(str) == block).to_numpy(), device=acts_layer.device)
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
    corr = analyses.neuron_target_correlation(neurons, y, train)  # [neurons, t]
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


@dataclass(kw_only=True)
class SpaceTimeSettings(ModelSettings, RunSettings):
    """Which datasets, how many entities, which prompts, and the analyses beside the probes (``seed``: the split,
    the random twin and the shuffled targets)."""

    datasets: list[str] = setting(list(ALL_DATASETS), "entity datasets, comma-separated", parse=name_list)
    n_entities: int | None = setting(3000, "entities per dataset (most popular first)", parse=positive_int)
    templates: list[str] = setting(["empty", "question"], "prompt templates, comma-separated (the first one is "
                                   "probed in depth): empty, question", parse=name_list)
    controls: bool = setting(True, "the random-weights and shuffled-targets controls (--no-controls skips them, "
                                   "faster)")
    n_blocks: int = setting(5, "blocks held out one at a time (the most frequent first)", parse=positive_int)
    neuron_ks: list[int] = setting([1, 4, 16, 64], "sizes of the top-k neuron probes", parse=positive_int_list)
    mlp: bool = setting(True, "the paper's MLP probe (256 hidden units, AdamW, weight decay chosen on a validation "
                              "split) against ridge at every layer (--no-mlp skips it)")
    mlp_epochs: int = setting(20, "most epochs of the MLP probe (early stopping after 3 without progress)",
                              parse=positive_int)
    mlp_batch_size: int = setting(512, "mini-batch size of the MLP probe", parse=positive_int)
    pca: bool = setting(True, "ridge probes on the top-k principal components (--no-pca skips them)")
    pca_ks: list[int] = setting([1, 2, 5, 10, 20, 50, 100, 200], "numbers of principal components (d_model is "
                                "added)", parse=positive_int_list)
    prompt_transfer: bool = setting(True, "the cross-prompt transfer matrix and probe cosines at the best layer "
                                          "(--no-prompt-transfer skips them)")
    variants: bool = setting(True, "the paper's prompt variants of each template (10 random tokens before it, the "
                                   "entity in capitals) in the transfer matrix (--no-variants: templates only)")
    entity_types: bool = setting(True, "probes trained on one entity type, tested on another (--no-entity-types "
                                       "skips them)")
    neuron_weights: bool = setting(True, "neurons by the cosine of their weights with the probe direction "
                                         "(--no-neuron-weights skips it)")
    ridge_views: bool = setting(True, "the ridge probe's train-test gap and R² of each target, per layer "
                                      "(--no-ridge-views skips them)")
    compare_models: list[str] = setting([], "other models probed side by side (R² by layer against depth; "
                                        "comma-separated names; random-twin: the model's random-weights twin)",
                                        parse=name_list)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self.datasets, self.templates)


def reproduce(model: ModelHandle, settings: SpaceTimeSettings, progress: bool = True,
              on_dataset: Callable[[dict], None] | None = None) -> tuple[dict, dict[str, dict[str, ProbeResult]]]:
    """The whole reproduction: the results dict (docs/results.md) and every probe run by dataset.

    ``on_dataset(results)`` is called after each dataset with the results so far (to save partial progress).
    ``settings.controls`` adds ``results["controls"][dataset]``: test R² by layer (first template) of the same probe
    on a random-weights twin of the model and on shuffled targets (:func:`control_curves`), and
    ``results["control_peaks"][dataset]``: each control's peak, as the dataset's own ``peak`` entry (the best layer,
    its test R², 95% bootstrap interval over the test entities and n).
    """
    seed = settings.seed
    results: dict = {"model": model.name, "n": settings.n_entities, "templates": list(settings.templates),
                     "datasets": {}, "settings": settings.to_dict()}
    twin = random_twin(model, seed) if settings.controls else None
    if twin is not None:
        results["controls"], results["control_peaks"] = {}, {}
        results["control_model"] = {"name": twin.name, "seed": seed,
                                    "weights_fingerprint": weights_fingerprint(twin)}
    runs_by_dataset: dict[str, dict[str, ProbeResult]] = {}
    for name in settings.datasets:
        runs_by_dataset[name] = _probe_dataset(model, name, settings, results, twin, progress)
        if on_dataset is not None:
            on_dataset(results)
    if settings.compare_models:
        from probes import space_time_models

        results["models_side_by_side"] = space_time_models.run_side_by_side(
            model, twin, results, settings.compare_models, settings.datasets, settings.n_entities,
            settings.templates[0], seed, progress, **settings.load_kwargs())
    return results, runs_by_dataset


def _probe_dataset(model: ModelHandle, name: str, settings: SpaceTimeSettings, results: dict,
                   twin: ModelHandle | None, progress: bool) -> dict[str, ProbeResult]:
    """One dataset: a probe per template, held-out blocks, neurons and controls, written into ``results``; returns
    the probe of each template."""
    templates, seed, alphas = settings.templates, settings.seed, DEFAULT_ALPHAS
    start = time.perf_counter()
    data = load_entities(name, n=settings.n_entities, seed=seed)
    runs, acts_by_template = {}, {}
    for template in templates:
        acts_by_template[template] = entity_activations(model, data, TEMPLATES[name][template], progress=progress)
        runs[template] = fit_layers(acts_by_template[template], data, alphas, template)
    acts_main = acts_by_template[templates[0]]
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
    entry["heldout_blocks"] = heldout_blocks(acts_main[:, best], data, BLOCK_COLUMNS[name], settings.n_blocks,
                                             alphas)
    neuron_layer = max(0, min(best, model.n_layers) - 1)  # MLP of the block feeding the best residual layer
    neurons = entity_activations(model, data, TEMPLATES[name][templates[0]],
                                 hooks=[f"blocks.{neuron_layer}.mlp.hook_post"], progress=progress)[:, 0]
    entry["neurons"] = {"layer": neuron_layer, **neuron_analysis(neurons, data, settings.neuron_ks, alphas)}
    entry.update(analyses.dataset_analyses(model, data, settings, {t: TEMPLATES[name][t] for t in templates},
                                           acts_by_template, best, neurons, neuron_layer, BLOCK_COLUMNS[name],
                                           progress))
    if twin is not None:
        fits = control_curves(twin, acts_main, data, TEMPLATES[name][templates[0]], alphas, seed, progress)
        results["controls"][name] = {control: fit.r2 for control, fit in fits.items()}
        results["control_peaks"][name] = {control: fit.peak for control, fit in fits.items()}
    entry["seconds"] = time.perf_counter() - start
    results["datasets"][name] = entry
    return runs


def run_outputs() -> tuple[str, ...]:
    """What a run writes in its folder: the whole set is replaced by the next run (with overwrite)."""
    from probes.space_time_plots import FIGURE_FILES

    return ("results.json", "plotly.min.js", *FIGURE_FILES)


def run(settings: SpaceTimeSettings, model: ModelHandle | None = None, progress: bool = True
        ) -> tuple[dict, dict[str, dict[str, ProbeResult]]]:
    """The experiment as ``settings`` say, into the run folder ``settings.out``: :func:`reproduce`, then
    ``OUT/results.json``, the HTML figures and the report page; returns the results and the probe runs by dataset
    (what :mod:`probes.space_time_plots` draws). ``model``: already loaded (default: ``settings.model``, loaded once
    the folder is accepted).

    ``results.json`` is rewritten after each dataset with ``"complete": false`` until the whole run has finished.
    A folder holding a previous run's outputs is refused unless ``settings.overwrite``, which removes them first.
    """
    from probes import space_time_plots as plots

    out = settings.out
    prepare_run_folder(out, run_outputs(), settings.overwrite)  # refused before the model loads
    model = model if model is not None else load_model(settings.model, **settings.load_kwargs())

    def save(partial: dict) -> None:
        atomic_write_json(out / "results.json", partial)

    results, runs = reproduce(model, settings, progress, on_dataset=lambda r: save({**r, "complete": False}))
    results["complete"] = True
    save(results)
    plots.write_all(results, runs, out)
    return results, runs


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(SpaceTimeSettings, argv, __doc__)
    results, _ = run(settings)
    for name, entry in results["datasets"].items():
        print(f"{name:18s} best layer {entry['best_layer']:2d}  R² {entry['best_r2']:.3f} {interval(entry['peak'])}  "
              f"(sklearn RidgeCV at that layer {entry['sklearn_ridgecv_r2_at_best_layer']:.3f})")
        for control, peak in results.get("control_peaks", {}).get(name, {}).items():
            print(f"{'':18s} {control:16s} peak R² {peak['r2']:.3f} {interval(peak)}")
    print(f"wrote {settings.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main, kept="results.json in --out holds the datasets finished so far (\"complete\": false)")
