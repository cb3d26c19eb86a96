"""SpARE (Zhao et al., 2024): steer which knowledge a model uses, its context or its memory, by editing the SAE
latents that carry the choice.

    python -m steering.spare --model embedded --dataset known_facts --out runs/spare

Steps: answer conflict prompts (a context that contradicts a fact) with no edit and group them by behaviour;
probe every layer for whether the context conflicts with memory; at each SAE's own hook point
(``cfg.metadata.hook_name``: the residual stream entering or leaving a block), rank latents by mutual information
with the behaviour and keep the top proportion, split by which behaviour activates them more; at inference, take
away the undesired behaviour's latents and add the desired one's expected activation there, on the last prompt
token and on every generated token. Baseline: activation addition of the difference in means between the two
behaviour groups at the same hook points. Both are tuned on a validation split (the strength, whether generated
tokens are edited too and, for SpARE, whether the undesired latents are removed or only the desired ones added);
exact match is reported on a held-out test split.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch

from probes.cache import extract, residual_hooks
from probes.cli_args import check_layers, layer_list, number_list, positive_int, run_cli
from probes.cli_args import proportion as proportion_arg
from probes.conflict import (
    ANSWER_BATCH,
    USES_CONTEXT,
    USES_MEMORY,
    ConflictExample,
    conflict_prompts,
    group_by_behaviour,
    kind_counts,
)
from probes.files import atomic_write_json, prepare_run_folder
from probes.forward import generate
from probes.linear import LogisticProbe
from probes.metrics import exact_match_rate, exact_matches, paired_bootstrap, rate_with_interval
from probes.models import ModelHandle, layer_count, load_model
from probes.progress import progress_bar
from probes.report import Table
from probes.settings import ModelSettings, RunSettings, parse_settings, setting
from steering.hooks import replace_residual
from steering.mutual_info import mutual_information, select_latents

Target = Literal["context", "memory"]
# Edit strengths tried on the validation split (the same for SpARE and activation addition).
STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EditSetting:
    """One point of the validation grid."""

    strength: float
    remove: bool = True     # SpARE: also take away the undesired behaviour's latents (else only add the desired's)
    generated: bool = True  # edit every generated token too, not only the last prompt token

    def label(self, method: str) -> str:
        parts = [f"strength {self.strength:g}"] + (["remove+add" if self.remove else "add only"]
                                                   if method == "spare" else [])
        return ", ".join(parts + ["prompt+generated" if self.generated else "prompt only"])


def edit_grid(method: str, strengths: Sequence[float] = STRENGTHS, generated: Sequence[bool] = (True, False),
              remove: Sequence[bool] = (True, False)) -> list[EditSetting]:
    """Every combination of the settings tried on validation for ``method`` ("spare" or "actadd")."""
    removes = remove if method == "spare" else (False,)
    return [EditSetting(s, r, g) for s, r, g in itertools.product(strengths, removes, generated)]


@dataclass
class BehaviourLatents:
    """The latents of one SAE chosen for each behaviour, with their expected activations per behaviour group."""

    layer: int
    mi: torch.Tensor            # [d_sae] mutual information with the behaviour label (nats)
    context: torch.Tensor       # indices of selected latents more active when the model uses the context
    memory: torch.Tensor        # ... when it uses its memory
    mean_context: torch.Tensor  # [d_sae] mean activation over prompts answered from the context
    mean_memory: torch.Tensor   # [d_sae] ... from memory


@torch.no_grad()
def behaviour_latents(sae, acts: torch.Tensor, uses_context: torch.Tensor, layer: int,
                      proportion: float = 0.01) -> BehaviourLatents:
    """Rank the SAE's latents on ``acts`` [n, d] (residual stream at the edited position) by mutual information
    with ``uses_context`` [n] (bool) and split the top ``proportion`` by the group in which each is more active."""
    uses_context = torch.as_tensor(uses_context, dtype=torch.bool, device=acts.device)
    if uses_context.all() or not uses_context.any():
        raise ValueError("need prompts of both behaviours (some answered from the context, some from memory)")
    z = sae.encode(acts.to(sae.W_dec.dtype)).float()
    mi = mutual_information(z, uses_context)
    top = select_latents(mi, proportion).to(z.device)
    mean_c, mean_m = z[uses_context].mean(0), z[~uses_context].mean(0)
    favours_context = mean_c[top] > mean_m[top]
    return BehaviourLatents(layer, mi.cpu(), top[favours_context], top[~favours_context], mean_c, mean_m)


def spare_edit(sae, latents: BehaviourLatents, target: Target, strength: float = 1.0, remove: bool = True) -> Edit:
    """``h -> delta``: remove the undesired behaviour's active latents (unless ``remove`` is false) and raise the
    desired behaviour's latents up to their expected activation, both through the SAE decoder, scaled by
    ``strength``."""
    if target not in ("context", "memory"):
        raise ValueError(f"target must be 'context' or 'memory', got {target!r}")
    # computed on the SAE's device, returned on the hidden state's (they differ on a model spread over devices)
    where = sae.W_dec.device
    keep, drop = (latents.context, latents.memory) if target == "context" else (latents.memory, latents.context)
    keep, drop = keep.to(where), drop.to(where)
    expected = (latents.mean_context if target == "context" else latents.mean_memory).to(where)[keep]
    w_keep, w_drop = sae.W_dec[keep].detach().float(), sae.W_dec[drop].detach().float()

    @torch.no_grad()
    def edit(h: torch.Tensor) -> torch.Tensor:
        z = sae.encode(h.to(where, sae.W_dec.dtype)).float()
        delta = (expected - z[:, keep]).clamp(min=0) @ w_keep
        if remove:
            delta = delta - z[:, drop] @ w_drop
        return (strength * delta).to(h.device, h.dtype)
    return edit


def add_edit(direction: torch.Tensor, coeff: float) -> Edit:
    """``h -> coeff * direction`` for every row: activation addition."""
    return lambda h: (coeff * direction).to(device=h.device, dtype=h.dtype).expand_as(h)


def edit_last_token(model: ModelHandle, edits: Mapping[str, Edit], generated: bool = True):
    """Context manager adding ``edits[hook](h)`` to the residual stream at ``hook`` (``blocks.<L>.hook_resid_pre``
    or ``blocks.<L>.hook_resid_post``) at the last position of every forward pass: the last prompt token (prompts
    are left-padded), then, if ``generated``, each generated token (one per cached step; a one-token forward pass
    counts as a generation step)."""
    def last_only(edit: Edit) -> Callable[[torch.Tensor], torch.Tensor]:
        def replace(hidden: torch.Tensor) -> torch.Tensor:
            if not generated and hidden.shape[1] == 1:
                return hidden
            hidden = hidden.clone()
            hidden[:, -1] += edit(hidden[:, -1])
            return hidden
        return replace

    return replace_residual(model, {hook: last_only(edit) for hook, edit in edits.items()})


# Methods compared on the same test prompts (paired bootstrap): (name, method, against).
COMPARISONS = (("spare_vs_no_edit", "spare", "no_edit"), ("spare_vs_actadd", "spare", "actadd"),
               ("actadd_vs_no_edit", "actadd", "no_edit"))


def match_statistics(matches: Mapping[str, Sequence[bool]]) -> tuple[dict, dict]:
    """Each method's exact match with its n and 95% Wilson interval, and the methods' differences on the same
    prompts with a paired-bootstrap 95% interval (:data:`COMPARISONS`)."""
    rates = {m: rate_with_interval(v) for m, v in matches.items()}
    return rates, {name: paired_bootstrap(matches[a], matches[b]) for name, a, b in COMPARISONS}


def split(examples: Sequence[ConflictExample], fractions: tuple[float, float] = (0.6, 0.2), seed: int = 0
          ) -> dict[str, list[ConflictExample]]:
    """Seeded train / val / test split (the rest after the two fractions goes to test)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    a, b = int(len(order) * fractions[0]), int(len(order) * sum(fractions))
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    if not all(parts.values()):
        raise ValueError(f"{len(examples)} examples are too few for a train/val/test split")
    return {k: [examples[i] for i in v] for k, v in parts.items()}


def conflict_probe(model: ModelHandle, train: Sequence[ConflictExample], test: Sequence[ConflictExample],
                   C: float = 1.0, progress: bool = True) -> list[float]:
    """Test accuracy per layer (embeddings, then after each block) of a logistic probe telling a conflicting
    (substituted) context from the original one, at the last prompt token."""
    def data(examples):
        prompts = conflict_prompts(examples, "sub") + conflict_prompts(examples, "org")
        acts = extract(model, prompts, hooks=residual_hooks(model), progress=progress).acts.float()
        return acts, torch.tensor([1] * len(examples) + [0] * len(examples), device=acts.device)

    x_train, y_train = data(train)
    x_test, y_test = data(test)
    probe = LogisticProbe(C=C).fit(x_train, y_train)
    return [float(a) for a in probe.score(x_test, y_test)]


def residual_at(model: ModelHandle, prompts: Sequence[str], hooks: Sequence[str], progress: bool = True
                ) -> torch.Tensor:
    """Residual stream at each of ``hooks`` at the last prompt token: [n, len(hooks), d]."""
    return extract(model, prompts, hooks=hooks, padding_side="left", progress=progress).acts.float()


def sae_hooks(model: ModelHandle, saes: Mapping[int, object]) -> dict[int, str]:
    """Each SAE's own hook point (:func:`steering.sae.sae_hook_name`), by SAE layer: where its latents are read, the
    activation-addition direction is measured and the edits land. Refuses hooks the workbench cannot edit and two
    SAEs at one hook."""
    from steering.sae import sae_hook_name

    hooks = {}
    for layer, sae in saes.items():
        try:
            hooks[layer] = sae_hook_name(sae, model)
        except ValueError as e:
            raise ValueError(f"SAE for layer {layer}: {e}") from e
    if len(set(hooks.values())) < len(hooks):
        raise ValueError(f"two SAEs act at the same hook point ({hooks}): keep one SAE per hook point")
    return hooks


@dataclass
class FittedSteering:
    """What :func:`fit_steering` learns from the training split: the SpARE latents and activation-addition
    directions, one per SAE layer, and where each acts; :meth:`edits` turns them into edits."""

    saes: Mapping[int, object]
    hooks: dict[int, str]  # each SAE's own hook point: where activations were read and where the edits land
    latents: dict[int, BehaviourLatents]
    directions: dict[int, torch.Tensor]  # mean(uses context) - mean(uses memory), residual stream

    def edits(self, method: str, target: Target, strength: float, remove: bool = True) -> dict[str, Edit]:
        """Edits at every SAE's hook point for ``method`` "spare" or "actadd" toward ``target``."""
        if method == "spare":
            return {self.hooks[layer]: spare_edit(self.saes[layer], self.latents[layer], target, strength, remove)
                    for layer in self.latents}
        if method == "actadd":
            sign = 1.0 if target == "context" else -1.0
            return {self.hooks[layer]: add_edit(d, sign * strength) for layer, d in self.directions.items()}
        raise ValueError(f"method must be 'spare' or 'actadd', got {method!r}")


def fit_steering(model: ModelHandle, saes: Mapping[int, object], examples: Sequence[ConflictExample],
                 labels: Sequence[str], proportion: float = 0.01, progress: bool = True) -> FittedSteering:
    """Latents and directions, at each SAE's hook point, from the training examples answered from the context or
    from memory."""
    keep = [i for i, g in enumerate(labels) if g in (USES_CONTEXT, USES_MEMORY)]
    layers = sorted(saes)
    hooks = sae_hooks(model, saes)
    acts = residual_at(model, conflict_prompts([examples[i] for i in keep], "sub"), [hooks[layer] for layer in layers],
                       progress)
    uses_context = torch.tensor([labels[i] == USES_CONTEXT for i in keep], device=acts.device)
    latents = {layer: behaviour_latents(saes[layer], acts[:, j], uses_context, layer, proportion)
               for j, layer in enumerate(layers)}
    directions = {layer: acts[uses_context, j].mean(0) - acts[~uses_context, j].mean(0)
                  for j, layer in enumerate(layers)}
    return FittedSteering(saes, hooks, latents, directions)


def steered_answers(model: ModelHandle, prompts: Sequence[str], edits: Mapping[str, Edit], max_new_tokens: int,
                    progress: bool = False, generated: bool = True) -> list[str]:
    """Greedy answers with ``edits`` (by hook point; none: the unedited model) applied, also to the generated tokens
    if ``generated``."""
    with edit_last_token(model, edits, generated):
        return generate(model, prompts, max_new_tokens, ANSWER_BATCH, progress, chat=False, first_line=True)


def references(examples: Sequence[ConflictExample], target: Target) -> list[tuple[str, ...]]:
    """The answers that count as ``target`` behaviour: the substituted context's, or the memorised ones."""
    return [e.sub_answers if target == "context" else e.org_answers for e in examples]


def steer(model: ModelHandle, fitted: FittedSteering, prompts: Sequence[str], method: str, target: Target,
          setting: EditSetting, max_new_tokens: int) -> list[str]:
    """Greedy answers steered by ``method`` toward ``target`` with one grid ``setting``."""
    edits = fitted.edits(method, target, setting.strength, setting.remove)
    return steered_answers(model, prompts, edits, max_new_tokens, generated=setting.generated)


def tune(model: ModelHandle, fitted: FittedSteering, val: Sequence[ConflictExample], method: str, target: Target,
         grid: Sequence[EditSetting], max_new_tokens: int, progress: bool = True
         ) -> tuple[EditSetting, dict[str, float]]:
    """The setting with the best validation exact match for ``target`` (the first of ties, in grid order) and the
    exact match of every setting, by label."""
    if not grid:
        raise ValueError(f"no settings to tune {method} on")
    prompts, refs = conflict_prompts(val, "sub"), references(val, target)
    scores = [exact_match_rate(steer(model, fitted, prompts, method, target, setting, max_new_tokens), refs)
              for setting in progress_bar(grid, desc=f"tune {method} to {target}", progress=progress)]
    best = max(range(len(grid)), key=scores.__getitem__)
    return grid[best], {setting.label(method): score for setting, score in zip(grid, scores, strict=True)}


@dataclass
class Experiment:
    """The split, the unedited behaviour on each part and the latents and directions fitted on the training part."""

    parts: dict[str, list[ConflictExample]]
    answers: dict[str, list[str]]  # unedited greedy answers on the substituted-context prompts
    groups: dict[str, list[str]]
    fitted: FittedSteering
    max_new_tokens: int  # answer length, the same for every edit compared


@dataclass(kw_only=True)
class SpareSettings(ModelSettings, RunSettings):
    """The conflict examples, the SAEs, the latent selection and the edits tried (``seed``: the split and the
    sample of examples)."""

    dataset: str = setting("known_facts", "conflict examples: the model's known facts (built once and cached in "
                                          "data/known_facts) or NQ-Swap", choices=("known_facts", "nqswap"))
    n_examples: int | None = setting(None, "examples used (default: all)", parse=positive_int)
    layers: list[int] | None = setting(None, "SAE layers to edit, e.g. 9,12 or 9-12 (default: every shipped SAE)",
                                       parse=layer_list)
    sae_dir: Path | None = setting(None, "folder of layer_<L> SAE folders (default: data/sae/<model>)", parse=Path)
    sae_release: str | None = setting(None, "SAELens release of pretrained SAEs, e.g. "
                                            "gemma-scope-2b-pt-res-canonical")
    sae_id: str | None = setting(None, "SAE id with {layer}, e.g. 'layer_{layer}/width_16k/canonical'")
    proportion: float = setting(0.01, "top proportion of latents by mutual information", parse=proportion_arg)
    strengths: list[float] = setting(list(STRENGTHS), "edit strengths tried on validation, e.g. 0.5,2",
                                     parse=number_list)
    tune_n: int | None = setting(None, "validation examples the edit settings are tuned on (default: all of the "
                                       "split)", parse=positive_int)
    max_new_tokens: int = setting(8, "tokens of each greedy answer", parse=positive_int)


def prepare(model: ModelHandle, examples: Sequence[ConflictExample], saes: Mapping[int, object],
            settings: SpareSettings | None = None, progress: bool = True) -> Experiment:
    """Split, answer every substituted-context prompt unedited, group by behaviour, fit latents and directions
    (``settings``: its ``seed``, ``proportion`` and ``max_new_tokens``; default :class:`SpareSettings`)."""
    settings = settings or SpareSettings()
    if not saes:
        raise ValueError("need at least one SAE (a mapping layer -> SAE)")
    sae_hooks(model, saes)  # an SAE that cannot be placed fails here, before the unedited answers are generated
    parts = split(examples, seed=settings.seed)
    answers = {k: steered_answers(model, conflict_prompts(v, "sub"), {}, settings.max_new_tokens, progress)
               for k, v in parts.items()}
    groups = {k: group_by_behaviour(answers[k], v) for k, v in parts.items()}
    fitted = fit_steering(model, saes, parts["train"], groups["train"], settings.proportion, progress)
    return Experiment(parts, answers, groups, fitted, settings.max_new_tokens)


def run_outputs() -> tuple[str, ...]:
    """What a run writes in its folder: the whole set is replaced by the next run (with overwrite)."""
    from steering.spare_plots import FIGURE_FILES

    return ("results.json", "plotly.min.js", *FIGURE_FILES)


def evaluate(model: ModelHandle, experiment: Experiment, settings: SpareSettings,
             spare_grid: Sequence[EditSetting] | None = None, actadd_grid: Sequence[EditSetting] | None = None,
             progress: bool = True) -> dict:
    """Conflict probe, edit settings tuned on validation (default grids: :func:`edit_grid` of
    ``settings.strengths``; on its first ``settings.tune_n`` examples if given, to spend less time: every setting
    answers every tuning prompt), exact match on test; writes ``settings.out/results.json`` (docs/results.md), the
    figures and the report page. A folder holding a previous run's outputs is refused unless
    ``settings.overwrite``, which removes them first."""
    grids = {"actadd": actadd_grid or edit_grid("actadd", settings.strengths),
             "spare": spare_grid or edit_grid("spare", settings.strengths)}
    start, out = time.perf_counter(), settings.out
    prepare_run_folder(out, run_outputs(), settings.overwrite)
    parts, fitted, max_new_tokens = experiment.parts, experiment.fitted, experiment.max_new_tokens
    tuning = parts["val"][:settings.tune_n]
    accuracy = conflict_probe(model, parts["train"], parts["test"], progress=progress)
    results: dict = {"model": model.name, "dataset": settings.dataset, "layers": list(range(len(accuracy))),
                     "conflict_probe_accuracy": accuracy, "spare_layers": sorted(fitted.latents),
                     "sae_hooks": dict(sorted(fitted.hooks.items())),
                     "n": {**{k: len(v) for k, v in parts.items()}, "tuning": len(tuning)},
                     "known_facts_kinds": {"all": kind_counts([e for v in parts.values() for e in v]),
                                           **{k: kind_counts(v) for k, v in parts.items()}},
                     "behaviour_counts": {k: {g: v.count(g) for g in sorted(set(v))}
                                          for k, v in experiment.groups.items()},
                     "latents": {layer: {"context": s.context.tolist(), "memory": s.memory.tolist(),
                                         "mi": s.mi[torch.cat([s.context, s.memory]).cpu()].tolist()}
                                 for layer, s in fitted.latents.items()},
                     "tuning": {}, "settings": settings.to_dict()}
    test_prompts = conflict_prompts(parts["test"], "sub")
    for target in ("context", "memory"):
        refs = references(parts["test"], target)
        matches = {"no_edit": exact_matches(experiment.answers["test"], refs)}
        for method, grid in grids.items():
            best, curve = tune(model, fitted, tuning, method, target, grid, max_new_tokens, progress)
            results["tuning"][f"{method}_to_{target}"] = {"setting": asdict(best), "label": best.label(method),
                                                         "val_exact_match": curve}
            matches[method] = exact_matches(
                steer(model, fitted, test_prompts, method, target, best, max_new_tokens), refs)
        results[f"steer_to_{target}"] = {m: sum(v) / len(v) for m, v in matches.items()}
        rates, comparisons = match_statistics(matches)
        results.setdefault("exact_match", {})[f"steer_to_{target}"] = rates
        results.setdefault("comparisons", {})[f"steer_to_{target}"] = comparisons
    results["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "results.json", results)
    from steering import spare_plots

    spare_plots.write_all(results, out)
    return results


def run(model: ModelHandle, examples: Sequence[ConflictExample], saes: Mapping[int, object],
        settings: SpareSettings, spare_grid: Sequence[EditSetting] | None = None,
        actadd_grid: Sequence[EditSetting] | None = None, progress: bool = True) -> dict:
    """The whole experiment on ``examples`` as ``settings`` say: :func:`prepare` then :func:`evaluate` (the folder
    checked first)."""
    prepare_run_folder(settings.out, run_outputs(), settings.overwrite)
    experiment = prepare(model, examples, saes, settings, progress)
    return evaluate(model, experiment, settings, spare_grid, actadd_grid, progress)


def example_answers(model: ModelHandle, experiment: Experiment, results: dict, n: int = 8) -> Table:
    """The first ``n`` held-out test prompts: the question, the answer its context states, the memorised answer,
    the unedited answer and SpARE's toward each behaviour with the settings tuned on validation."""
    test = experiment.parts["test"][:n]
    prompts = conflict_prompts(test, "sub")
    steered = [steer(model, experiment.fitted, prompts, "spare", target,
                     EditSetting(**results["tuning"][f"spare_to_{target}"]["setting"]), experiment.max_new_tokens)
               for target in ("context", "memory")]
    rows = zip(test, experiment.answers["test"][:n], *steered, strict=True)
    return Table("Example answers (held-out test prompts)",
                 ["question", "context says", "memory", "no edit", "SpARE to context", "SpARE to memory"],
                 [[e.question, e.sub_answers[0], e.org_answers[0], *answers] for e, *answers in rows])


def load_inputs(model: ModelHandle, settings: SpareSettings) -> tuple[dict[int, object], list[ConflictExample]]:
    """The SAEs (:func:`load_saes`) and the conflict examples (:func:`conflict_examples`) ``settings`` name."""
    saes = load_saes(model, settings.layers, settings.sae_dir, settings.sae_release, settings.sae_id)
    return saes, conflict_examples(model, settings.dataset, settings.n_examples, settings.seed)


def load_saes(model: ModelHandle, layers: Sequence[int] | None, sae_dir: Path | None = None,
              release: str | None = None, sae_id: str | None = None) -> dict[int, object]:
    """SAEs by layer: from ``sae_dir`` (``layer_<L>`` folders written by :func:`steering.sae.save_sae`; default
    ``data/sae/<model>``), or pretrained through SAELens (``release`` and an ``sae_id`` with ``{layer}`` in it).
    Each acts at its own hook point, checked here (:func:`sae_hooks`)."""
    from steering.sae import load_pretrained_sae, load_sae

    folders = sae_folders(model.name, layers, sae_dir, release, sae_id)
    if folders is None:
        saes = {layer: load_pretrained_sae(release, sae_id.format(layer=layer), model.device) for layer in layers}
    else:
        saes = {layer: load_sae(path, model.device) for layer, path in folders.items()}
    sae_hooks(model, saes)
    return saes


def sae_folders(model_name: str, layers: Sequence[int] | None, sae_dir: Path | None = None,
                release: str | None = None, sae_id: str | None = None) -> dict[int, Path] | None:
    """The SAE folder of each layer asked for (``None`` for a pretrained release), checked without loading
    anything: the command line calls it before the model loads."""
    from steering.sae import SAE_DIR

    if release:
        if not sae_id or "{layer}" not in sae_id or not layers:
            raise ValueError("a pretrained release needs --layers and an --sae-id containing {layer}, e.g. "
                             "'layer_{layer}/width_16k/canonical'")
        return None
    sae_dir = sae_dir or SAE_DIR / model_name.replace("/", "--")
    found = {int(p.name.split("_")[1]): p for p in sorted(sae_dir.glob("layer_*")) if p.is_dir()}
    if not found:
        raise FileNotFoundError(f"no SAEs under {sae_dir}; train them with `python -m steering.train_saes "
                                f"--model {model_name}` or pass --sae-release/--sae-id")
    missing = [layer for layer in layers or [] if layer not in found]
    if missing:
        raise ValueError(f"no SAE for layer(s) {missing} under {sae_dir}; there are {sorted(found)}")
    return {layer: found[layer] for layer in (layers or sorted(found))}


def conflict_examples(model: ModelHandle, dataset: str, n: int | None, seed: int = 0) -> list[ConflictExample]:
    """``known_facts`` (the model's own, built once and cached in ``data/known_facts``) or ``nqswap``."""
    from probes.conflict import known_facts, nqswap_examples
    from probes.datasets import load_nqswap

    if dataset == "known_facts":
        examples = known_facts(model)
        return examples if n is None else random.Random(seed).sample(examples, min(n, len(examples)))
    if dataset == "nqswap":
        return nqswap_examples(load_nqswap(n=n, seed=seed))
    raise ValueError(f"unknown dataset {dataset!r}; choose known_facts or nqswap")


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(SpareSettings, argv, __doc__)
    check_layers(settings.layers, layer_count(settings.model), settings.model)
    sae_folders(settings.model, settings.layers, settings.sae_dir, settings.sae_release, settings.sae_id)
    prepare_run_folder(settings.out, run_outputs(), settings.overwrite)  # refused before the model loads
    model = load_model(settings.model, **settings.load_kwargs())
    saes, examples = load_inputs(model, settings)
    results = run(model, examples, saes, settings)
    best = max(range(len(results["conflict_probe_accuracy"])), key=results["conflict_probe_accuracy"].__getitem__)
    print(f"conflict probe: best layer {best}, accuracy {results['conflict_probe_accuracy'][best]:.3f}")
    for target in ("steer_to_context", "steer_to_memory"):
        print(f"{target:17s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[target].items()))
    print(f"wrote {settings.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main, kept="results.json and the figures are written only at the end: nothing half-written is left")
