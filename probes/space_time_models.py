"""Models side by side: the same space and time probes on several models, R² by layer against depth as a fraction
of the layers, so that models of different depth line up (the paper's figure: Llama-2 7B, 13B and 70B).

Offline every model here is 135M (the embedded model, the refusal organism, the random twin): the figure then shows
the plumbing, not scale. With the network, pass a family of sizes (e.g. Qwen/Qwen2.5-0.5B,...,Qwen/Qwen2.5-7B).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from probes.datasets import load_entities
from probes.linear import DEFAULT_ALPHAS
from probes.models import ModelHandle, load_model
from probes.random_models import random_twin
from probes.space_time import TEMPLATES, entity_activations, fit_layers

RANDOM_TWIN = "random-twin"  # a model name here: the random-weights twin of the probed model


def resolve_models(names: Iterable[str], model: ModelHandle, seed: int = 0, **load_kwargs) -> Iterable[ModelHandle]:
    """Each name as a loaded model, one at a time (a large model is freed before the next loads); the probed
    ``model``'s own name gives it back, :data:`RANDOM_TWIN` gives its random-weights twin."""
    for name in names:
        if name == model.name:
            yield model
        elif name == RANDOM_TWIN:
            yield random_twin(model, seed)
        else:
            yield load_model(name, **load_kwargs)


def _entry(model: ModelHandle, r2: dict, peak: dict) -> dict:
    """One model's entry: its name and shape, depth (layer / n_layers) of each residual point, R² by layer and the
    peak of each dataset."""
    return {"name": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
            "depth": [layer / model.n_layers for layer in range(model.n_layers + 1)], "r2": r2, "peak": peak}


def model_curves(model: ModelHandle, datasets: Sequence[str], n_entities: int | None, template: str = "empty",
                 seed: int = 0, alphas: Sequence[float] = DEFAULT_ALPHAS, progress: bool = True) -> dict:
    """One model's ridge probes by layer on each dataset: test R², depth (layer / n_layers) and the peak with its
    95% bootstrap interval."""
    out = _entry(model, {}, {})
    for name in datasets:
        data = load_entities(name, n=n_entities, seed=seed)
        fit = fit_layers(entity_activations(model, data, TEMPLATES[name][template], progress=progress), data,
                         alphas, template)
        out["r2"][name], out["peak"][name] = fit.r2, fit.peak
    return out


def curves_from_results(results: dict, model: ModelHandle) -> dict:
    """The probed model's entry of :func:`models_side_by_side`, read from its run's ``results`` (first template)
    rather than probed again."""
    return _entry(model, {name: e["r2"] for name, e in results["datasets"].items()},
                  {name: e["peak"] for name, e in results["datasets"].items()})


def models_side_by_side(models: Iterable[ModelHandle], datasets: Sequence[str], n_entities: int | None,
                        template: str = "empty", seed: int = 0, progress: bool = True) -> dict:
    """:func:`model_curves` of each model, in order: ``{"template", "models": [...]}`` for ``results.json`` and
    :func:`probes.space_time_plots.models_side_by_side`."""
    return {"template": template, "n_entities": n_entities,
            "models": [model_curves(m, datasets, n_entities, template, seed, progress=progress) for m in models]}


def curves_of_twin(results: dict, twin: ModelHandle) -> dict:
    """The random-weights twin's entry, read from the run's random-weights control (the same twin, seed, template
    and split) rather than probed again."""
    return _entry(twin, {name: curves["random_weights"] for name, curves in results["controls"].items()},
                  {name: peaks["random_weights"] for name, peaks in results["control_peaks"].items()})


def run_side_by_side(model: ModelHandle, twin: ModelHandle | None, results: dict, names: Sequence[str],
                     datasets: Sequence[str], n_entities: int | None, template: str, seed: int = 0,
                     progress: bool = True, **load_kwargs) -> dict:
    """The run's own model (from ``results``) and each model of ``names`` side by side, in order (as
    :func:`models_side_by_side`); the random twin comes from the controls when they ran (``twin``). Models are
    loaded one at a time (:func:`resolve_models`)."""
    reuse_twin = twin is not None and "controls" in results
    others = resolve_models([n for n in names if not (reuse_twin and n == RANDOM_TWIN)], model, seed, **load_kwargs)
    entries = [curves_from_results(results, model)]
    for name in names:
        if reuse_twin and name == RANDOM_TWIN:
            entries.append(curves_of_twin(results, twin))
        else:
            entries.append(model_curves(next(others), datasets, n_entities, template, seed, progress=progress))
    return {"template": template, "n_entities": n_entities, "models": entries}
