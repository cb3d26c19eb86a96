"""SpARE's comparison as the paper runs it (Zhao et al. 2025): for each seed, draw the in-context demonstrations
from the training facts, answer, group by behaviour, fit every method on the training split, tune it on
validation and answer the test split; then summarise over seeds.

Everything downstream of the prompts is rerun per seed; the split stays fixed. Over seeds each method's exact match
is reported as mean ± sd; SpARE is compared with every other method on the same test prompts by a bootstrap over
prompts of the seed-averaged difference (:func:`probes.metrics.paired_bootstrap`). The conflict probe (an L1
logistic probe per layer on the residual stream, the attention output and the MLP output) runs once, on the first
seed's prompts.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict
from typing import Mapping, Sequence

import torch

from probes.cache import extract, residual_hooks
from probes.conflict import (
    DEMONSTRATIONS,
    NEITHER,
    USES_CONTEXT,
    USES_MEMORY,
    ConflictExample,
    Demonstration,
    conflict_prompts,
    group_by_behaviour,
    kind_counts,
)
from probes.files import atomic_write_json, prepare_run_folder
from probes.forward import answer_token_nll
from probes.linear import LogisticProbe
from probes.metrics import (
    bootstrap_auc,
    exact_match_rate,
    exact_matches,
    paired_bootstrap,
    rate_with_interval,
    wilson_interval,
)
from probes.models import ModelHandle
from probes.progress import progress_bar
from steering.latent_dashboard import write_selected
from steering.spare import (
    SpareSettings,
    Target,
    fit_steering,
    references,
    residual_at,
    sae_hooks,
)
from steering.spare_methods import METHODS, Method, SeedRun, Setting, setting_label

GROUPS = (USES_CONTEXT, USES_MEMORY, NEITHER)


def draw_demonstrations(train: Sequence[ConflictExample], shots: int, seed: int
                        ) -> tuple[dict[str, list[Demonstration]], list[ConflictExample]]:
    """``shots`` training facts drawn with ``seed``, written three ways: for the prompt (original context ->
    original answer, the paper's), showing the context used (substituted context -> its answer) and showing memory
    used (substituted context -> original answer); and the training facts left once they are taken out."""
    if len(train) < shots + 2:
        raise ValueError(f"{len(train)} training examples are too few to draw {shots} demonstrations from and fit on "
                         "the rest: use more examples (--n-examples) or fewer --shots")
    picked = set(random.Random(seed).sample(range(len(train)), shots))
    facts = [train[i] for i in sorted(picked)]
    demos = {"plain": [Demonstration(e.org_context, e.question, e.org_answers[0]) for e in facts],
             "context": [Demonstration(e.sub_context, e.question, e.sub_answers[0]) for e in facts],
             "memory": [Demonstration(e.sub_context, e.question, e.org_answers[0]) for e in facts]}
    return demos, [e for i, e in enumerate(train) if i not in picked]


def demonstrations(train: Sequence[ConflictExample], settings: SpareSettings, seed: int
                   ) -> tuple[dict[str, list[Demonstration]], list[ConflictExample]]:
    """:func:`draw_demonstrations`; with ``settings.demonstrations == "fixed"`` the prompt keeps the workbench's
    hand-written demonstrations (the behaviour demonstrations are still drawn)."""
    demos, rest = draw_demonstrations(train, settings.shots, seed)
    if settings.demonstrations == "fixed":
        demos["plain"] = list(DEMONSTRATIONS)
    return demos, rest


def confidence_weights(model: ModelHandle, prompts: Sequence[str], examples: Sequence[ConflictExample],
                       uses_context: torch.Tensor) -> torch.Tensor:
    """The paper's confidence weight of each prompt: for one answered from the context, NLL(original answer) /
    (NLL(substituted) + NLL(original)); for one answered from memory, NLL(substituted) / (the same sum). NLL is the
    mean per answer token, teacher-forced (:func:`probes.forward.answer_token_nll`)."""
    sub = answer_token_nll(model, prompts, [" " + e.sub_answers[0] for e in examples])
    org = answer_token_nll(model, prompts, [" " + e.org_answers[0] for e in examples])
    uses_context = torch.as_tensor(uses_context, dtype=torch.bool).cpu()
    return torch.where(uses_context, org, sub) / (sub + org)


def _activations(model: ModelHandle, run: SeedRun, examples: Sequence[ConflictExample], hooks: list[str],
                 kinds: Sequence[str], progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Last-token residual stream of the examples' prompts of each kind, by hook point."""
    acts = {}
    for kind in kinds:
        stacked = residual_at(model, run.prompts(examples, kind), hooks, progress)
        acts[kind] = {hook: stacked[:, j] for j, hook in enumerate(hooks)}
    return acts


def fit_seed(model: ModelHandle, saes: Mapping[int, object], train: Sequence[ConflictExample],
             settings: SpareSettings, seed: int, progress: bool = True) -> tuple[SeedRun, dict]:
    """Draw the demonstrations, answer the training prompts unedited, group them and fit SpARE, activation
    addition and the activations TaskVec and SEA need: the seed's :class:`SeedRun`, and the training behaviour."""
    demos, rest = demonstrations(train, settings, seed)
    hooks = sae_hooks(model, saes)
    taskvec = ({layer: f"blocks.{layer}.hook_resid_pre" for layer in taskvec_layers(settings, model.n_layers)}
               if "taskvec" in settings.methods else {})
    run = SeedRun(seed, settings, demos, None, taskvec_hooks=taskvec, n_layers=model.n_layers)
    answers = METHODS["no_edit"].answer(model, run, rest, "context", {})
    groups = group_by_behaviour(answers, rest)
    kept = [e for e, g in zip(rest, groups, strict=True) if g != NEITHER]
    uses_context = torch.tensor([g == USES_CONTEXT for g in groups if g != NEITHER])
    layers = sorted(saes)
    read = list(dict.fromkeys([hooks[layer] for layer in layers] + list(taskvec.values())))
    kinds = ["plain"] + (["context", "memory"] if {"sea", "taskvec"} & set(settings.methods) else [])
    run.acts = _activations(model, run, kept, read, kinds, progress)
    weights = (confidence_weights(model, run.prompts(kept, "plain"), kept, uses_context)
               if settings.targets == "confidence" else None)
    share = None if settings.proportion else settings.mi_share
    run.fitted = fit_steering(saes, hooks, run.acts["plain"], uses_context, settings.proportion, share, weights)
    return run, {"train_behaviour": {g: groups.count(g) for g in GROUPS}, "train_fitted_on": len(kept)}


def taskvec_layers(settings: SpareSettings, n_layers: int) -> list[int]:
    """The layers TaskVec is tried at: ``settings.taskvec_layers``, else about 30%, 45% and 60% of the depth
    (Hendel et al. find the task vector in the middle layers)."""
    layers = settings.taskvec_layers or sorted({round(f * n_layers) for f in (0.3, 0.45, 0.6)})
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"TaskVec layer(s) {bad} out of range 0..{n_layers - 1}")
    return layers


def tune(model: ModelHandle, run: SeedRun, method: Method, target: Target, val: Sequence[ConflictExample],
         progress: bool = True) -> tuple[Setting, dict[str, float]]:
    """The grid point with the best validation exact match toward ``target`` (the first of ties, in grid order) and
    every point's exact match by label; a method with one setting is not run on validation."""
    grid = method.grid(run.settings, run)
    if not grid:
        raise ValueError(f"no settings to tune {method.name} on")
    if len(grid) == 1:
        return grid[0], {}
    refs = references(val, target)
    scores = [exact_match_rate(method.answer(model, run, val, target, setting), refs)
              for setting in progress_bar(grid, desc=f"seed {run.seed}: tune {method.name} to {target}",
                                          progress=progress)]
    best = max(range(len(grid)), key=scores.__getitem__)
    return grid[best], {setting_label(s): score for s, score in zip(grid, scores, strict=True)}


def transitions(before: Sequence[str], after: Sequence[str]) -> dict[str, int]:
    """How many prompts went from each unedited behaviour to each steered one, e.g. ``"memory -> context"``."""
    counts = {f"{a} -> {b}": 0 for a in GROUPS for b in GROUPS}
    for a, b in zip(before, after, strict=True):
        counts[f"{a} -> {b}"] += 1
    return counts


def run_seed(model: ModelHandle, saes: Mapping[int, object], parts: Mapping[str, list[ConflictExample]],
             settings: SpareSettings, seed: int, progress: bool = True) -> dict:
    """One seed: fit, tune every method toward every direction it can steer, answer the test prompts. Returns
    the per-prompt exact matches, tuned settings, behaviour transitions and the latents, by target and method."""
    run, fit_info = fit_seed(model, saes, parts["train"], settings, seed, progress)
    test, val = parts["test"], parts["val"][:settings.tune_n]
    unedited = METHODS["no_edit"].answer(model, run, test, "context", {})
    before = group_by_behaviour(unedited, test)
    out = {"seed": seed, "demonstrations": [asdict(d) for d in run.demonstrations["plain"]], **fit_info,
           "test_behaviour": {g: before.count(g) for g in GROUPS}, "tuning": {}, "matches": {}, "changes": {},
           "answers": {}, "latents": {layer: {"context": s.context.tolist(), "memory": s.memory.tolist(),
                                              "mi": s.mi[torch.cat([s.context, s.memory]).cpu()].tolist()}
                                      for layer, s in run.fitted.latents.items()}}
    for target in settings.directions:
        refs = references(test, target)
        for name in settings.methods:
            method = METHODS[name]
            if target not in method.targets:
                continue
            setting, curve = tune(model, run, method, target, val, progress)
            answers = unedited if name == "no_edit" else method.answer(model, run, test, target, setting)
            out["tuning"][f"{name}_to_{target}"] = {"setting": setting, "label": setting_label(setting),
                                                     "val_exact_match": curve}
            out["matches"].setdefault(target, {})[name] = exact_matches(answers, refs)
            out["changes"].setdefault(target, {})[name] = transitions(before, group_by_behaviour(answers, test))
            out["answers"].setdefault(target, {})[name] = answers
    return out


def summary(per_seed: Sequence[Sequence[bool]]) -> dict:
    """Exact match over seeds: mean ± sd of the per-seed rates, each seed's rate with its Wilson interval, and the
    Wilson interval of the seed-mean rate at the n test prompts."""
    rates = [rate_with_interval(m) for m in per_seed]
    values = [r["rate"] for r in rates]
    n = rates[0]["n"]
    mean = statistics.fmean(values)
    return {"mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": n, "seeds": len(values),
            "ci95": list(wilson_interval(round(mean * n), n)), "per_seed": rates}


def seed_average(per_seed: Sequence[Sequence[bool]]) -> torch.Tensor:
    """Each test prompt's exact match averaged over seeds: [n] float64."""
    return torch.tensor(per_seed, dtype=torch.float64).mean(0)


def aggregate(seeds: Sequence[dict], directions: Sequence[Target]) -> dict:
    """Exact match (mean ± sd over seeds), SpARE against every other method on the same prompts (bootstrap over
    prompts of the seed-averaged difference) and behaviour transitions summed over seeds, by target."""
    out = {"exact_match": {}, "comparisons": {}, "behaviour_changes": {}}
    for target in directions:
        key = f"steer_to_{target}"
        names = list(seeds[0]["matches"].get(target, {}))
        matches = {m: [s["matches"][target][m] for s in seeds] for m in names}
        out["exact_match"][key] = {m: summary(v) for m, v in matches.items()}
        if "spare" in matches:
            spare = seed_average(matches["spare"])
            out["comparisons"][key] = {f"spare_vs_{m}": paired_bootstrap(spare, seed_average(v))
                                       for m, v in matches.items() if m != "spare"}
        out["behaviour_changes"][key] = {m: {k: sum(s["changes"][target][m][k] for s in seeds)
                                             for k in seeds[0]["changes"][target][m]} for m in names}
    return out


def conflict_probe(model: ModelHandle, train: Sequence[ConflictExample], test: Sequence[ConflictExample],
                   demonstrations: Sequence[Demonstration], C: float = 1.0, progress: bool = True) -> dict:
    """Does the context conflict with memory? An L1 logistic probe (:class:`probes.linear.LogisticProbe`) per
    layer on the residual stream, the attention output and the MLP output, at the last prompt token, telling the
    substituted context from the original one. A question's two prompts stay on one side of the split (questions
    are held out as groups). Test accuracy, AUROC and AUPRC with 95% intervals from resampling held-out questions."""
    n_layers = model.n_layers
    streams = {"residual": residual_hooks(model), "attn_out": [f"blocks.{i}.hook_attn_out" for i in range(n_layers)],
               "mlp_out": [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]}
    hooks = [h for names in streams.values() for h in names]

    def data(examples):
        prompts = conflict_prompts(examples, "sub", demonstrations) + conflict_prompts(examples, "org", demonstrations)
        acts = extract(model, prompts, hooks=hooks, progress=progress).acts.float()
        return acts, torch.tensor([1] * len(examples) + [0] * len(examples), device=acts.device)

    (x_train, y_train), (x_test, y_test) = data(train), data(test)
    probe = LogisticProbe(C=C, penalty="l1").fit(x_train, y_train)
    scores, accuracy = probe.decision_function(x_test), probe.score(x_test, y_test)
    groups = torch.arange(len(test), device=scores.device).repeat(2)
    areas = {m: bootstrap_auc(scores, y_test, groups, metric=m) for m in ("auroc", "auprc")}
    out, start = {"C": C, "n_train": len(y_train), "n_test": len(y_test), "n_groups": len(test)}, 0
    for stream, names in streams.items():
        part = slice(start, start + len(names))
        start += len(names)
        out[stream] = {"accuracy": accuracy[part].tolist()}
        for m, per_layer in areas.items():
            out[stream][m] = [e["value"] for e in per_layer[part]]
            out[stream][f"{m}_ci95"] = [e["ci95"] for e in per_layer[part]]
    return out


def method_table(settings: SpareSettings) -> dict:
    """What each method compared is: its label, the directions it steers, why not the other, what it sees."""
    return {name: {"label": m.label, "targets": list(m.targets), "not_applicable": m.not_applicable,
                   "extra_input": m.extra_input} for name in settings.methods for m in [METHODS[name]]}


def run(model: ModelHandle, examples: Sequence[ConflictExample], saes: Mapping[int, object],
        settings: SpareSettings, progress: bool = True) -> dict:
    """The whole comparison as ``settings`` say: split (``settings.seed``), conflict probe, ``settings.n_seeds``
    seeds of :func:`run_seed`, the summary over seeds; writes ``settings.out/results.json`` (docs/results.md), the
    figures and the report page. A folder holding a previous run's outputs is refused unless ``overwrite``."""
    from steering import spare_plots
    from steering.spare import run_outputs, split

    start, out = time.perf_counter(), settings.out
    prepare_run_folder(out, run_outputs(), settings.overwrite)
    settings.check_examples(len(examples))
    sae_hooks(model, saes)  # an SAE that cannot be placed fails here, before any answer is generated
    parts = split(examples, seed=settings.seed)
    probe_demos = demonstrations(parts["train"], settings, 0)[0]["plain"]
    probe = conflict_probe(model, parts["train"], parts["test"], probe_demos, settings.probe_c, progress)
    seeds = [run_seed(model, saes, parts, settings, seed, progress)
             for seed in progress_bar(range(settings.n_seeds), desc="seeds", progress=progress)]
    results = {"model": model.name, "dataset": settings.dataset, "protocol": settings.protocol(),
               "methods": method_table(settings), "spare_layers": sorted(saes),
               "sae_hooks": dict(sorted(sae_hooks(model, saes).items())), "conflict_probe": probe,
               # the contract's per-layer probe accuracy: the residual stream's (0 = embeddings)
               "layers": list(range(len(probe["residual"]["accuracy"]))),
               "conflict_probe_accuracy": probe["residual"]["accuracy"],
               "n": {**{k: len(v) for k, v in parts.items()}, "tuning": len(parts["val"][:settings.tune_n])},
               "known_facts_kinds": {"all": kind_counts(examples), **{k: kind_counts(v) for k, v in parts.items()}},
               **aggregate(seeds, settings.directions), "settings": settings.to_dict()}
    for target, rows in results["exact_match"].items():
        results[target] = {m: v["mean"] for m, v in rows.items()}  # the headline: mean exact match over seeds
    results["per_seed"] = [{k: v for k, v in s.items() if k not in ("matches", "answers")} for s in seeds]
    results["example_answers"] = example_answers(parts["test"], seeds[0])
    if settings.dashboard_tokens:
        results["latent_dashboards"] = write_selected(model, saes, seeds[0]["latents"], out / "latents",
                                                      settings.dashboard_tokens, progress)
    results["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "results.json", results)
    spare_plots.write_all(results, out)
    return results


def example_answers(test: Sequence[ConflictExample], seed: dict, n: int = 8) -> list[dict]:
    """The first ``n`` test prompts of one seed: the question, the two answers and each method's, by target."""
    rows = []
    for i, e in enumerate(test[:n]):
        rows.append({"question": e.question, "context_says": e.sub_answers[0], "memory": e.org_answers[0],
                     **{f"{m}_to_{t}": answers[i] for t, by in seed["answers"].items() for m, answers in by.items()}})
    return rows
