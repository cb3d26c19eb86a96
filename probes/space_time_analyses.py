"""The comparisons behind Gurnee & Tegmark's four claims (linear, robust to the prompt, unified across entity types,
carried in part by single neurons), each a function of activations and an :class:`EntityData` returning a dict for
``results.json``; :mod:`probes.space_time` runs them and :mod:`probes.space_time_plots` draws them.

Test R² of a part of the test set (a held-out block, one entity type) is computed against the variance of the whole
test set: a block's own variance is tiny (one country, one decade), so an R² within it says little.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from probes.architecture import mlp_neuron_weights
from probes.cache import extract
from probes.datasets import EntityData
from probes.linear import DEFAULT_ALPHAS, RidgeProbe
from probes.metrics import _percentile_interval, _r2, _resample_rows, bootstrap_r2, proximity_error, r2_score, spearman
from probes.mlp_probe import MLPProbe
from probes.models import ModelHandle
from probes.pca_probe import PCA_KS, PCAProbe
from probes.positions import mark_span

VARIANTS = ("random_prefix", "caps")  # the paper's prompt variants (feature_datasets/common.py)
N_PREFIX_TOKENS = 10
# Column whose values are entity types, per dataset (a probe trained on one type is tested on another).
ENTITY_TYPE_COLUMNS = {"world_place": "entity_type", "us_place": "entity_type", "art": "entity_type",
                       "historical_figure": "category"}


def _split(data: EntityData, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets [n, t] float64, train and test masks, on ``device``."""
    y = torch.as_tensor(data.targets, dtype=torch.float64, device=device)
    test = torch.as_tensor(data.is_test, device=device)
    return y, ~test, test


def _floats(x) -> list:
    return torch.as_tensor(x).double().cpu().tolist()


def paired_r2_difference(truth, pred_a, pred_b, n_resamples: int = 2000, seed: int = 0) -> dict:
    """R² of ``pred_a`` minus R² of ``pred_b`` on the same test rows, with a 95% interval from resampling the rows
    (the same resamples for both), and whether it excludes 0: is one probe better beyond the noise of the split."""
    t = torch.as_tensor(truth, dtype=torch.float64)
    t = t.reshape(len(t), -1)
    a, b = (torch.as_tensor(p, dtype=torch.float64, device=t.device).reshape(t.shape) for p in (pred_a, pred_b))
    rows = _resample_rows(len(t), n_resamples, seed, t.device)
    low, high = _percentile_interval(_r2(t[rows], a[rows]) - _r2(t[rows], b[rows]))
    diff = r2_score(t, a) - r2_score(t, b)
    return {"difference": diff, "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0), "n": len(t),
            "n_resamples": n_resamples, "seed": seed}


def r2_against(truth: torch.Tensor, pred: torch.Tensor, reference: torch.Tensor) -> float:
    """1 - SS_res / (n * Var(reference)), averaged over targets: R² of a part of the test set scored against the
    variance of the whole test set (``reference``, its true values) rather than the part's own."""
    t, p, ref = (x.double().reshape(len(x), -1) for x in (truth, pred, reference))
    ss_res = (t - p).square().sum(0)
    return float((1 - ss_res / (len(t) * ref.var(0, correction=0).clamp(min=1e-300))).mean())


def ridge_views(acts: torch.Tensor, data: EntityData, alphas: Sequence[float] = DEFAULT_ALPHAS) -> dict:
    """The ridge probe's train and test R² per layer (the train-test gap: how much it overfits) and the test R²
    of each target separately (latitude and longitude, or the year)."""
    y, train, test = _split(data, acts.device)
    probe = RidgeProbe(alphas).fit(acts[train], y[train])
    pred_train, pred_test = probe.predict(acts[train]), probe.predict(acts[test])
    train_r2, test_r2 = r2_score(y[train], pred_train), r2_score(y[test], pred_test)
    by_target = {name: _floats(r2_score(y[test][:, i], pred_test[..., i])) for i, name in enumerate(data.target_names)}
    return {"train_r2": _floats(train_r2), "test_r2": _floats(test_r2), "gap": _floats(train_r2 - test_r2),
            "r2_by_target": by_target}


def ridge_vs_mlp(acts: torch.Tensor, data: EntityData, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 mlp: MLPProbe | None = None) -> dict:
    """The paper's MLP probe against ridge at every layer on the same split: test R² of each with 95% bootstrap
    intervals, the MLP's weight decay, and at ridge's best layer the paired difference MLP - ridge and both
    probes' test predictions (for a scatter of one against the other)."""
    y, train, test = _split(data, acts.device)
    ridge = RidgeProbe(alphas).fit(acts[train], y[train]).predict(acts[test])  # [L, n_test, t]
    mlp = (mlp or MLPProbe()).fit(acts[train], y[train])
    net = mlp.predict(acts[test])
    truth = y[test]
    peaks = {"ridge": [bootstrap_r2(truth, p) for p in ridge], "mlp": [bootstrap_r2(truth, p) for p in net]}
    best = int(np.argmax([p["r2"] for p in peaks["ridge"]]))
    return {"layers": list(range(acts.shape[1])),
            **{f"{k}_r2": [p["r2"] for p in v] for k, v in peaks.items()},
            **{f"{k}_ci95": [p["ci95"] for p in v] for k, v in peaks.items()},
            "mlp_weight_decay": [float(w) for w in np.atleast_1d(mlp.weight_decay_)],
            "mlp_train_r2": _floats(r2_score(y[train], mlp.predict(acts[train]))),
            "mlp_settings": {"hidden": mlp.hidden, "epochs": mlp.epochs, "patience": mlp.patience,
                             "batch_size": mlp.batch_size, "lr": mlp.lr, "weight_decays": list(mlp.weight_decays)},
            "ridge_best_layer": best, "mlp_best_layer": int(np.argmax([p["r2"] for p in peaks["mlp"]])),
            "mlp_minus_ridge_at_best_layer": paired_r2_difference(truth, net[best], ridge[best]),
            "predictions_at_best_layer": {"truth": _floats(truth), "ridge": _floats(ridge[best]),
                                          "mlp": _floats(net[best])}}


def pca_analysis(acts: torch.Tensor, data: EntityData, best_layer: int, ks: Sequence[int] = PCA_KS,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, layer_curve_k: int = 10) -> dict:
    """Test R² (and Spearman for time) of ridge on the top-k principal components, every k and layer; at the best
    layer against k with the explained-variance ratio, and the layer curve for ``layer_curve_k``."""
    y, train, test = _split(data, acts.device)
    pca = PCAProbe(ks, alphas).fit(acts[train], y[train])
    pred = pca.predict(acts[test])  # [K, L, n_test, t]
    r2 = [_floats(r2_score(y[test], p)) for p in pred]
    out = {"ks": pca.ks_, "r2": r2, "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
           "at_best_layer": {"layer": best_layer, "r2": [row[best_layer] for row in r2],
                             "ci95": [bootstrap_r2(y[test], p[best_layer])["ci95"] for p in pred],
                             "explained_variance_ratio": pca.explained_variance_ratio_[:, best_layer].tolist()}}
    if data.kind == "time":
        rho = [[spearman(y[test][:, 0], p[layer][:, 0]) for layer in range(p.shape[0])] for p in pred]
        out["spearman"] = rho
        out["at_best_layer"]["spearman"] = [row[best_layer] for row in rho]
    if layer_curve_k in pca.ks_:
        out["layer_curve"] = {"k": layer_curve_k, "r2": r2[pca.ks_.index(layer_curve_k)]}
    return out


def variant_prompts(data: EntityData, template: str, variant: str, tokenizer, seed: int = 0
                    ) -> list[tuple[str, tuple[int, int]]]:
    """Prompts of a template under one of the paper's variants, with the entity's character span:
    ``"random_prefix"`` puts the text of 10 random token ids (seeded, new for each entity) before the prompt,
    ``"caps"`` writes the entity in capitals."""
    if variant == "caps":
        return [mark_span(template, e.upper()) for e in data.entities]
    if variant != "random_prefix":
        raise ValueError(f"unknown prompt variant {variant!r}; choose from {list(VARIANTS)}")
    rng = np.random.default_rng(seed)
    special = set(getattr(tokenizer, "all_special_ids", []))
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special])
    out = []
    for entity in data.entities:
        prefix = tokenizer.decode(rng.choice(allowed, N_PREFIX_TOKENS).tolist()) + " "
        prompt, (start, end) = mark_span(template, entity)
        out.append((prefix + prompt, (start + len(prefix), end + len(prefix))))
    return out


def variant_activations(model: ModelHandle, data: EntityData, template: str, variant: str, seed: int = 0,
                        progress: bool = True) -> torch.Tensor:
    """Residual stream at the entity's last token under a prompt variant: [n, n_layers + 1, d]."""
    from probes.cache import residual_hooks

    marked = variant_prompts(data, template, variant, model.tokenizer, seed)
    cache = extract(model, [p for p, _ in marked], hooks=residual_hooks(model), positions="span_last",
                    spans=[s for _, s in marked], progress=progress)
    return cache.acts


def transfer_matrix(acts_by_prompt: dict[str, torch.Tensor], data: EntityData,
                    alphas: Sequence[float] = DEFAULT_ALPHAS) -> dict:
    """Probes trained on each prompt's train rows and tested on every prompt's test rows (one layer,
    ``acts_by_prompt[name]`` [n, d]): ``r2[a][b]`` reads prompt b with the probe of prompt a; ``cosine[a][b]``:
    cosine of the two probes' directions, averaged over targets."""
    names = list(acts_by_prompt)
    first = next(iter(acts_by_prompt.values()))
    y, train, test = _split(data, first.device)
    probes = {name: RidgeProbe(alphas).fit(a[train], y[train]) for name, a in acts_by_prompt.items()}
    scores = [[bootstrap_r2(y[test], probes[a].predict(acts_by_prompt[b][test])) for b in names] for a in names]
    unit = {name: torch.nn.functional.normalize(p.coef_.reshape(y.shape[1], -1), dim=-1) for name, p in probes.items()}
    cosine = [[float((unit[a] * unit[b]).sum(-1).mean()) for b in names] for a in names]
    return {"prompts": names, "r2": [[cell["r2"] for cell in row] for row in scores],
            "r2_ci95": [[cell["ci95"] for cell in row] for row in scores], "n_test": int(test.sum()),
            "cosine": cosine}


def r2_against_interval(truth: torch.Tensor, pred: torch.Tensor, reference: torch.Tensor, n_resamples: int = 2000,
                        seed: int = 0) -> list[float]:
    """95% percentile interval of :func:`r2_against` from resampling the part's rows (the reference variance, the
    whole test set's, held fixed)."""
    t, p = truth.double().reshape(len(truth), -1), pred.double().reshape(len(pred), -1)
    var = reference.double().reshape(len(reference), -1).var(0, correction=0).clamp(min=1e-300)
    rows = _resample_rows(len(t), n_resamples, seed, t.device)
    return list(_percentile_interval((1 - (t[rows] - p[rows]).square().mean(1) / var).mean(-1)))


def _proximity_in_test(pred_rows: torch.Tensor, rows: torch.Tensor, truth_test: torch.Tensor) -> float:
    """Mean proximity error of predictions for some test rows, each against every test entity's true position."""
    pred = truth_test.clone()
    pred[rows] = pred_rows.reshape(pred[rows].shape)
    return float(proximity_error(pred, truth_test)[rows].mean())


def heldout_block_scores(acts_layer: torch.Tensor, data: EntityData, column: str, n_blocks: int = 5,
                         alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[dict]:
    """The paper's held-out blocks: a probe trained without one block (a country, a decade) and one trained with
    it, both scored on the block's test rows by proximity error against all test entities (0 is perfect) and by
    R² against the variance of the whole test set."""
    frame = data.frame
    y, train, test = _split(data, acts_layer.device)
    column_values = frame[column].astype(str)
    seen = RidgeProbe(alphas).fit(acts_layer[train], y[train])
    truth_test, rows = y[test], []
    for block in column_values.value_counts().index[:n_blocks]:
        in_block = torch.tensor((column_values == block).to_numpy(), device=acts_layer.device)
        block_rows = in_block[test].nonzero()[:, 0]
        if len(block_rows) < 5:
            continue
        held = RidgeProbe(alphas).fit(acts_layer[train & ~in_block], y[train & ~in_block])
        x_block, t_block = acts_layer[test][block_rows], truth_test[block_rows]
        row = {"block": block, "n_test": len(block_rows)}
        for key, probe in (("heldout", held), ("seen", seen)):
            pred = probe.predict(x_block)
            row[f"proximity_error_{key}"] = _proximity_in_test(pred, block_rows, truth_test)
            row[f"r2_{key}_vs_test_variance"] = r2_against(t_block, pred, truth_test)
        rows.append(row)
    return rows


def entity_type_transfer(acts_layer: torch.Tensor, data: EntityData, column: str, n_types: int = 3,
                         alphas: Sequence[float] = DEFAULT_ALPHAS) -> dict:
    """A probe trained on one entity type's train rows, tested on each type's test rows (e.g. cities against
    natural places): ``r2[a][b]`` against the variance of the whole test set, ``proximity_error[a][b]`` against
    every test entity, for the ``n_types`` most frequent types."""
    y, train, test = _split(data, acts_layer.device)
    values = data.frame[column].astype(str)
    types = [t for t in values.value_counts().index[:n_types]]
    masks = {t: torch.tensor((values == t).to_numpy(), device=acts_layer.device) for t in types}
    types = [t for t in types if int((masks[t] & train).sum()) >= 5 and int((masks[t][test]).sum()) >= 2]
    truth_test = y[test]
    r2, r2_ci, prox = [], [], []
    for a in types:
        probe = RidgeProbe(alphas).fit(acts_layer[train & masks[a]], y[train & masks[a]])
        pred_test = probe.predict(acts_layer[test])
        r2.append([r2_against(truth_test[masks[b][test]], pred_test[masks[b][test]], truth_test) for b in types])
        r2_ci.append([r2_against_interval(truth_test[masks[b][test]], pred_test[masks[b][test]], truth_test)
                      for b in types])
        prox.append([_proximity_in_test(pred_test[masks[b][test]], masks[b][test].nonzero()[:, 0], truth_test)
                     for b in types])
    return {"column": column, "types": types, "n_train": [int((masks[t] & train).sum()) for t in types],
            "n_test": [int((masks[t] & test).sum()) for t in types], "r2": r2, "r2_ci95": r2_ci,
            "proximity_error": prox}


def neuron_target_correlation(neurons: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each neuron with each target over ``rows``: [n_neurons, t]."""
    x, t = neurons[rows].double(), y[rows].double()
    xc, tc = x - x.mean(0), t - t.mean(0)
    return (xc.T @ tc) / (xc.norm(dim=0)[:, None] * tc.norm(dim=0)[None, :]).clamp(min=1e-12)


def neuron_weight_alignment(model: ModelHandle, mlp_layer: int, direction: torch.Tensor, neurons: torch.Tensor,
                            data: EntityData, top: int = 10) -> dict:
    """Neurons of block ``mlp_layer``'s MLP by their weights, as ``model_composition.py``: the cosine between the
    probe ``direction`` [t, d] and each neuron's output weights (what it writes) and input weights (up and, where
    gated, gate projection), next to the neuron's activation correlation with the target on the train split
    (``neurons`` [n, n_neurons]). Per target: the ``top`` neurons by |cosine with the output weights| and by
    |activation correlation|, each with both measures."""
    weights = mlp_neuron_weights(model.bridge, model.hf_model, mlp_layer)
    y, train, _ = _split(data, neurons.device)
    corr = neuron_target_correlation(neurons, y, train).cpu()
    unit = torch.nn.functional.normalize(direction.double().cpu().reshape(y.shape[1], -1), dim=-1)
    cos = {k: torch.nn.functional.normalize(w.double().cpu(), dim=-1) @ unit.T for k, w in weights.items()}
    out = {"layer": mlp_layer, "inputs": sorted(k for k in cos if k != "out"), "targets": {}}
    for i, name in enumerate(data.target_names):
        def describe(index: int, i: int = i) -> dict:
            return {"neuron": index, "correlation": float(corr[index, i]),
                    **{f"cos_{k}": float(c[index, i]) for k, c in cos.items()}}

        by_weight = torch.argsort(cos["out"][:, i].abs(), descending=True)[:top]
        by_corr = torch.argsort(corr[:, i].abs(), descending=True)[:top]
        out["targets"][name] = {
            "by_output_weight": [describe(int(j)) for j in by_weight],
            "by_activation": [describe(int(j)) for j in by_corr],
            "max_abs_cos_out": float(cos["out"][:, i].abs().max()),
            "abs_cos_out_vs_abs_correlation_spearman": spearman(cos["out"][:, i].abs(), corr[:, i].abs())}
    return out


def ridge_test_r2(acts: torch.Tensor, data: EntityData, alphas: Sequence[float] = DEFAULT_ALPHAS) -> list[float]:
    """Test R² of the ridge probe at each layer."""
    y, train, test = _split(data, acts.device)
    return _floats(r2_score(y[test], RidgeProbe(alphas).fit(acts[train], y[train]).predict(acts[test])))


def prompt_robustness(model: ModelHandle, data: EntityData, templates: dict[str, str],
                      acts_by_template: dict[str, torch.Tensor], layer: int, variants: Sequence[str] = VARIANTS,
                      seed: int = 0, progress: bool = True) -> dict:
    """Each template under each of the paper's variants (test R² by layer), then the transfer matrix and the
    probe cosines at ``layer`` across every prompt: templates and their variants."""
    at_layer = {name: acts[:, layer] for name, acts in acts_by_template.items()}
    curves = {}
    for name, template in templates.items():
        for variant in variants:
            acts = variant_activations(model, data, template, variant, seed, progress)
            curves[f"{name}_{variant}"] = ridge_test_r2(acts, data)
            at_layer[f"{name}_{variant}"] = acts[:, layer].clone()  # not a view: the rest of acts is freed
    return {"layer": layer, "variants": list(variants), "r2_by_layer": curves,
            **transfer_matrix(at_layer, data)}


def dataset_analyses(model: ModelHandle, data: EntityData, settings, templates: dict[str, str],
                     acts_by_template: dict[str, torch.Tensor], best: int, neurons: torch.Tensor | None,
                     neuron_layer: int, block_column: str, progress: bool = True) -> dict:
    """Every comparison of this module that ``settings`` (:class:`probes.space_time.SpaceTimeSettings`) asks for,
    on one dataset, by its ``results.json`` key; the first template's activations are the probed ones."""
    acts = next(iter(acts_by_template.values()))
    out: dict = {"heldout_block_scores": heldout_block_scores(acts[:, best], data, block_column, settings.n_blocks)}
    if settings.ridge_views:
        out["ridge_views"] = ridge_views(acts, data)
    if settings.mlp:
        probe = MLPProbe(epochs=settings.mlp_epochs, batch_size=settings.mlp_batch_size, seed=settings.seed)
        out["ridge_vs_mlp"] = ridge_vs_mlp(acts, data, mlp=probe)
    if settings.pca:
        out["pca"] = pca_analysis(acts, data, best, settings.pca_ks)
    if settings.entity_types and data.name in ENTITY_TYPE_COLUMNS:
        out["entity_type_transfer"] = entity_type_transfer(acts[:, best], data, ENTITY_TYPE_COLUMNS[data.name])
    if settings.neuron_weights and neurons is not None:
        y, train, _ = _split(data, acts.device)
        direction = RidgeProbe().fit(acts[train][:, best], y[train]).coef_
        out["neuron_weights"] = neuron_weight_alignment(model, neuron_layer, direction, neurons, data)
    if settings.prompt_transfer:
        out["prompt_robustness"] = prompt_robustness(model, data, templates, acts_by_template, best,
                                                     VARIANTS if settings.variants else (), settings.seed, progress)
    return out
