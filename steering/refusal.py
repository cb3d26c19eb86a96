"""Arditi et al. (2024), "Refusal in Language Models Is Mediated by a Single Direction", as the paper's steps.

    python -m steering.refusal --model embedded-refuser --out runs/refusal
    python -m steering.refusal --model meta-llama/Llama-3.2-1B-Instruct --out runs/llama_refusal

1. :func:`candidate_directions`: the difference in means of harmful and harmless training instructions, at each
   layer and post-instruction token position;
2. :func:`selection`: each candidate scored on validation instructions by the refusal log-odds after ablating it
   (harmful), after adding it (harmless) and by the KL divergence it causes on harmless prompts; the best one is
   selected;
3. :func:`completions`: greedy completions of the evaluation sets' instructions as the model is, with the direction
   ablated and with it added (and, after step 5, with the edited weights);
4. :func:`evaluation`: the completions judged, refusal rates with intervals and each edit against the baseline;
   :func:`ablation_kl` and :func:`answer_losses` measure what the edits cost on harmless prompts;
5. :func:`edit`: the direction removed from the weights, and the edited model compared with the hooks;
6. :func:`save`: the selected direction, every candidate's scores, the completions and the edited checkpoint.

:func:`run` runs them in that order. Steps 1-3 are cached in ``OUT/cache/<step>/`` (:func:`cached`), keyed by the
settings each depends on and the weights' fingerprint, so a rerun after an interruption resumes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from probes.cache import extract
from probes.cli_args import name_list, non_negative_float, non_negative_int, positive_int, run_cli
from probes.datasets import (
    DATA_DIR,
    REFUSAL_KINDS,
    REFUSAL_SPLITS,
    load_jailbreakbench,
    load_nqswap,
    load_refusal_instructions,
)
from probes.devices import is_offloaded
from probes.errors import WorkbenchError
from probes.files import atomic_write_json, prepare_run_folder
from probes.forward import (
    answer_batch,
    answer_loss,
    answer_nll,
    chat_token_ids,
    generate,
    kl_divergence,
    last_token_logits,
    next_token_logprobs,
    pad_id,
    text_token_ids,
)
from probes.metrics import Z95, paired_bootstrap, rate_with_interval
from probes.models import ModelHandle, load_model
from probes.progress import progress_bar
from probes.provenance import weights_fingerprint
from probes.settings import BatchSettings, ModelSettings, OutputSettings, parse_settings, setting
from steering import refusal_plots
from steering.directions import DIRECTION_FILE, CandidateDirections, SelectedDirection, diff_in_means
from steering.hooks import ablate, add
from steering.judges import Judge, SafetyJudge, refusals, substring_judge
from steering.orthogonalize import orthogonalize_against_hooks, save_checkpoint
from steering.step_cache import StepCache, Store, cached

# First words of refusals; their first tokens make up the refusal log-odds that score the candidates.
REFUSAL_STARTS = ("I", "Sorry", "As", "Unfortunately")
# The paper's selection filters: no candidate from the last PRUNE_LAST of the layers, none with KL above KL_MAX.
PRUNE_LAST, KL_MAX = 0.2, 0.1



def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def held_out(instructions: Sequence[str]) -> list[str]:
    """``instructions`` without those (case and whitespace folded) in a train or validation split, which the
    directions and the organism (``steering.organism``, trained on the train splits) were made from."""
    seen = _seen_instructions()
    return [i for i in instructions if _normalized(i) not in seen]


@functools.cache
def _seen_instructions() -> frozenset[str]:
    """Every train and validation instruction, folded; read once per process (each paper set asks for it)."""
    return frozenset(_normalized(i) for kind in REFUSAL_KINDS for split in ("train", "val")
                     for i in load_refusal_instructions(split, kind))


def _paper_set(name: str) -> list[str]:
    """One of the paper's harmful test sets, shipped in ``data/refusal/`` (data/PROVENANCE.md), held out."""
    frame = (load_jailbreakbench() if name == "jailbreakbench"
             else pd.read_json(DATA_DIR / "refusal" / f"{name}.json.gz"))
    return held_out(frame["instruction"].astype(str).tolist())


PAPER_SETS = ("jailbreakbench", "harmbench", "strongreject")
# Where each instruction group comes from (all of it; a run takes the first n of each).
SOURCES: dict[str, Callable[[], list[str]]] = {
    **{f"{kind}_{split}": functools.partial(load_refusal_instructions, split, kind)
       for kind in REFUSAL_KINDS for split in REFUSAL_SPLITS},
    **{name: functools.partial(_paper_set, name) for name in PAPER_SETS},
}
# The sets the evaluation judges (settings.eval_sets): harmful instructions, judged as the model is, with the direction
# ablated and with it removed from the weights; harmless ones, judged as the model is and with the direction added.
# A new set is one entry here (and its source above); the steps read it from there.
EVAL_SETS: dict[str, dict[str, str]] = {
    "test": {"harmful": "harmful_test", "harmless": "harmless_test"},
    **{name: {"harmful": name, "harmless": "harmless_test"} for name in PAPER_SETS},
}
CONDITIONS = {"harmful": ("baseline", "ablation", "orthogonalized"), "harmless": ("baseline", "actadd")}
BEFORE_EDIT = ("baseline", "ablation", "actadd")  # conditions made with hooks, on the unedited weights
AFTER_EDIT = ("orthogonalized",)  # the model as it is once edit() has removed the direction from its weights
# The refusal rates of results.json, and the comparisons made on the same prompts: (name, edited, baseline).
RATE_KEYS = tuple(f"{kind}_{condition}" for kind, conditions in CONDITIONS.items() for condition in conditions)
COMPARISONS = (("harmful_ablation_vs_baseline", "harmful_ablation", "harmful_baseline"),
               ("harmful_orthogonalized_vs_baseline", "harmful_orthogonalized", "harmful_baseline"),
               ("harmless_actadd_vs_baseline", "harmless_actadd", "harmless_baseline"))
# A selection saved for later (notebook 03 reads it back): the direction and every candidate's scores.
SELECTION_OUTPUTS = (DIRECTION_FILE, "direction.json", "selection.json")
# What a run writes in its folder (replaced as a whole by the next run); OUT/cache is kept: it resumes runs.
OUTPUTS = ("results.json", "completions.json", "plotly.min.js", "checkpoint", *SELECTION_OUTPUTS,
           *refusal_plots.FIGURE_FILES)


def rate_statistics(refused: dict[str, Sequence[bool]]) -> dict:
    """Each refusal rate with its n and 95% Wilson interval, and each edit against its baseline on the same prompts
    (paired bootstrap of the difference): the results.json keys ``refusal_rate`` and ``comparisons``, for the
    conditions of :data:`RATE_KEYS` that ``refused`` holds."""
    return {"refusal_rate": {k: rate_with_interval(refused[k]) for k in RATE_KEYS if k in refused},
            "comparisons": {name: paired_bootstrap(refused[a], refused[b]) for name, a, b in COMPARISONS
                            if a in refused and b in refused}}


def refusal_token_ids(model: ModelHandle) -> list[int]:
    """The first token of each word in ``REFUSAL_STARTS`` for this tokenizer."""
    return sorted({model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in REFUSAL_STARTS})


def refusal_log_odds(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds of the first answer token being a refusal token, per prompt: log p - log(1 - p)."""
    p = logprobs[:, list(token_ids)].exp().sum(-1).clamp(1e-8, 1 - 1e-8)
    return torch.log(p) - torch.log1p(-p)


@dataclass
class CandidateScore:
    """One candidate's selection scores (means over the validation prompts) and whether it passed the filters."""

    position: int
    layer: int
    ablation_refusal: float
    addition_refusal: float
    kl: float
    kept: bool


def _per_candidate(model: ModelHandle, ids: list[list[int]], n_candidates: int,
                   intervene: Callable[[list[int]], ContextManager], reduce: Callable[[torch.Tensor, list[int]],
                   torch.Tensor], batch_size: int, mix: bool, bar: tqdm) -> torch.Tensor:
    """``reduce(logprobs, prompt_rows)`` for every (candidate, prompt) under ``intervene(candidate_rows)``: [K, N].

    ``mix=True`` packs rows of different candidates into one forward pass (sorted by length, ``batch_size`` rows
    each); ``mix=False`` evaluates one candidate at a time (its prompts in batches of ``batch_size``).
    """
    by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    if mix:
        groups = [sorted(((k, i) for k in range(n_candidates) for i in by_length), key=lambda r: len(ids[r[1]]))]
    else:
        groups = [[(k, i) for i in by_length] for k in range(n_candidates)]
    out = torch.empty(n_candidates, len(ids))
    for rows in groups:
        for start in range(0, len(rows), batch_size):
            ks, prompts = map(list, zip(*rows[start:start + batch_size], strict=True))
            with intervene(ks):
                logprobs = torch.log_softmax(last_token_logits(model, [ids[i] for i in prompts]), -1)
            out[ks, prompts] = reduce(logprobs, prompts).float().cpu()
            bar.update(1)
    return out


def score_candidates(model: ModelHandle, candidates: CandidateDirections, harmful: Sequence[str],
                     harmless: Sequence[str], prune_last: float = PRUNE_LAST, kl_max: float = KL_MAX,
                     batch_size: int = 64,
                     mix_candidates: bool = True, progress: bool = True) -> list[CandidateScore]:
    """Score every candidate and mark those passing the paper's filters.

    Per candidate: mean refusal log-odds (:func:`refusal_log_odds`) on ``harmful`` with the direction ablated, on
    ``harmless`` with it added at its layer, and mean KL(baseline || ablated) of the next-token distribution on
    ``harmless``. Candidates in the last ``prune_last`` fraction of layers, and all-zero ones (the template tokens
    at the embedding), are skipped.
    Kept: KL <= ``kl_max`` and positive refusal log-odds under addition. ``mix_candidates`` evaluates many
    candidates per forward pass (one direction per batch row), which keeps a GPU busy on small models.
    """
    if not harmful or not harmless:
        raise ValueError("need harmful and harmless validation prompts")
    tokens = refusal_token_ids(model)
    max_layer = int(model.n_layers * (1 - prune_last))
    pairs = [(position, layer) for position in candidates.positions for layer in candidates.layers
             if layer < max_layer and candidates.get(position, layer).norm() > 1e-6]
    if not pairs:
        raise ValueError(f"no candidate below layer {max_layer} with a non-zero direction")
    vectors = torch.stack([candidates.get(*pair) for pair in pairs]).to(model.device, model.dtype)
    layers = [layer for _, layer in pairs]
    harmful_ids, harmless_ids = chat_token_ids(model, harmful), chat_token_ids(model, harmless)
    base = torch.cat([torch.log_softmax(last_token_logits(model, harmless_ids[i:i + batch_size]), -1)
                      for i in range(0, len(harmless_ids), batch_size)])
    passes = sum(math.ceil(len(ids) * (len(pairs) if mix_candidates else 1) / batch_size) *
                 (1 if mix_candidates else len(pairs)) for ids in (harmful_ids, harmless_ids, harmless_ids))
    bar = progress_bar(total=passes, desc="score candidates", unit="pass", progress=progress)

    def ablated(ks):
        return ablate(model, vectors[ks[0]] if len(set(ks)) == 1 else vectors[ks])

    def added(ks):
        if len(set(ks)) == 1:
            return add(model, vectors[ks[0]], layers[ks[0]])
        return add(model, vectors[ks], [layers[k] for k in ks])

    def score(logprobs, prompts):
        return refusal_log_odds(logprobs, tokens)

    def kl(logprobs, prompts):
        return kl_divergence(base[prompts], logprobs)

    run = dict(batch_size=batch_size, mix=mix_candidates, bar=bar)
    ablation = _per_candidate(model, harmful_ids, len(pairs), ablated, score, **run).mean(1)
    kls = _per_candidate(model, harmless_ids, len(pairs), ablated, kl, **run).mean(1)
    addition = _per_candidate(model, harmless_ids, len(pairs), added, score, **run).mean(1)
    bar.close()
    return [CandidateScore(position, layer, float(a), float(s), float(k), bool(k <= kl_max and s > 0))
            for (position, layer), a, s, k in zip(pairs, ablation, addition, kls, strict=True)]


def select(scores: Sequence[CandidateScore]) -> CandidateScore:
    """The kept candidate whose ablation lowers the harmful refusal log-odds most.

    When no candidate passes the KL filter, the filter is relaxed rather than dropped: among candidates whose
    addition induces refusal and whose ablation removes it (scores > 0 and < 0), the one with the smallest KL;
    failing that, the smallest KL among those whose addition induces refusal, then among all. ``kept`` on the
    returned score tells which case applied.
    """
    if not scores:
        raise ValueError("no candidates to select from")
    kept = [s for s in scores if s.kept]
    if kept:
        return min(kept, key=lambda s: s.ablation_refusal)
    inducing = [s for s in scores if s.addition_refusal > 0]
    both = [s for s in inducing if s.ablation_refusal < 0]
    return min(both or inducing or list(scores), key=lambda s: s.kl)


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(kw_only=True)
class RefusalSettings(ModelSettings, OutputSettings, BatchSettings):
    """How many instructions each step reads, how long the completions are, which layers are scored, which
    residual dimensions are left out, which sets are evaluated and by which judge."""

    model: str = setting("embedded-refuser", "model: embedded, embedded-refuser, random:<preset>, a Hugging Face id "
                                             "or a local folder")
    batch_size: int = setting(64, "rows per forward pass (candidates scored together share a pass)",
                              parse=positive_int)
    n_train: int = setting(128, "harmful and harmless training instructions each (the difference in means)",
                           parse=positive_int)
    n_val: int = setting(32, "harmful and harmless validation instructions each (scoring the candidates)",
                         parse=positive_int)
    n_test: int = setting(64, "held-out instructions of each kind in each evaluation set", parse=positive_int)
    max_new_tokens: int = setting(128, "tokens generated per completion (the paper: 512; use it on a GPU)",
                                  parse=positive_int)
    layer_step: int = setting(1, "score every k-th layer only (faster)", parse=positive_int)
    outlier_ratio: float = setting(10.0, "leave out of the directions the residual dimensions whose mean |activation| "
                                         "exceeds this many times the median dimension's (massive activations); 0 "
                                         "keeps the paper's plain difference in means", parse=non_negative_float)
    eval_sets: list[str] = setting(["test"], "instruction sets the evaluation judges, comma-separated: "
                                   + ", ".join(EVAL_SETS) + "; the first gives refusal_score", parse=name_list)
    judge: Judge = setting(substring_judge, "decides whether a completion refuses its instruction", cli=False)
    geometry: bool = setting(True, "measure where the direction is expressed and how the candidates align")
    base_model: str = setting("auto", "the model the organism was trained from, compared with it (auto: embedded for "
                                      "embedded-refuser; none skips)")
    n_general: int = setting(64, "Wikipedia passages and headlines each for the loss on general text (0 skips)",
                             parse=non_negative_int)
    general_tokens: int = setting(128, "tokens of each general text scored", parse=positive_int)
    short_tokens: int = setting(32, "also judge each completion on its first this many tokens (0 skips)",
                                parse=non_negative_int)
    safety_judge: str = setting("", "a generative safety classifier (Hub id or local folder, Llama Guard style) "
                                    "giving safety_score; empty skips")

    def __post_init__(self) -> None:
        super().__post_init__()
        if 0 < self.outlier_ratio <= 1:
            raise ValueError(f"--outlier-ratio must be above 1 (or 0 to keep every dimension), got "
                             f"{self.outlier_ratio}")
        unknown = sorted(set(self.eval_sets) - set(EVAL_SETS))
        if unknown or not self.eval_sets:
            raise ValueError(f"unknown or no evaluation sets {unknown}; choose from {', '.join(EVAL_SETS)}")


def instructions(settings: RefusalSettings) -> dict[str, list[str]]:
    """The instructions a run reads, by group: ``{harmful,harmless}_{train,val}`` (``n_train``, ``n_val`` each)
    and the groups of every evaluation set (``n_test`` each)."""
    sizes = {f"{kind}_{split}": n for kind in REFUSAL_KINDS
             for split, n in (("train", settings.n_train), ("val", settings.n_val))}
    sizes |= {group: settings.n_test for name in settings.eval_sets for group in EVAL_SETS[name].values()}
    return {group: SOURCES[group]()[:n] for group, n in sizes.items()}


def _first_set(settings: RefusalSettings) -> dict[str, str]:
    """The groups of the first evaluation set, on which the edits' costs are measured."""
    return EVAL_SETS[settings.eval_sets[0]]


def _jobs(settings: RefusalSettings, conditions: Sequence[str]) -> list[tuple[str, str]]:
    """Every (instruction group, condition) the evaluation sets ask for among ``conditions``, each once."""
    jobs = {(group, condition): None for name in settings.eval_sets for kind, group in EVAL_SETS[name].items()
            for condition in CONDITIONS[kind] if condition in conditions}
    return list(jobs)


CANDIDATES = Store(".safetensors", lambda value, path, key: value.save(path, key), CandidateDirections.load)


def _directions_key(settings: RefusalSettings) -> dict:
    return {"n_train": settings.n_train, "layer_step": settings.layer_step,
            "outlier_ratio": settings.outlier_ratio or None}


def _selection_key(settings: RefusalSettings) -> dict:
    return {**_directions_key(settings), "n_val": settings.n_val}


def _completions_key(settings: RefusalSettings, group: str, condition: str, selected: SelectedDirection) -> dict:
    """Baseline completions depend on the instructions only; the others on the selected direction too."""
    key = {"instructions": group, "n": settings.n_test, "max_new_tokens": settings.max_new_tokens,
           "condition": condition}
    if condition == "baseline":
        return key
    return {**key, **_selection_key(settings), "direction": [selected.layer, selected.position]}


# --------------------------------------------------------------------------------------------------------- steps
def candidate_directions(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                         cache: StepCache | None = None, progress: bool = True) -> CandidateDirections:
    """Step 1: the difference in means of the harmful and harmless training instructions at the input of every
    ``layer_step``-th block and every post-instruction position, without the dimensions of massive activations
    (``outlier_ratio``; :func:`steering.directions.outlier_dimensions`). Cached in ``cache/directions/``."""
    def compute() -> CandidateDirections:
        return diff_in_means(model, prompts["harmful_train"], prompts["harmless_train"],
                             layers=list(range(0, model.n_layers, settings.layer_step)),
                             outlier_ratio=settings.outlier_ratio, progress=progress)

    candidates = cached(cache, "directions", "candidates", _directions_key(settings), compute, CANDIDATES)
    return replace(candidates, vectors=candidates.vectors.to(model.device))


def selection(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
              candidates: CandidateDirections, cache: StepCache | None = None, progress: bool = True
              ) -> tuple[list[CandidateScore], SelectedDirection]:
    """Step 2: every candidate scored on the validation instructions (:func:`score_candidates`; the scores are
    cached in ``cache/selection/``), and the one :func:`select` picks, with where it came from."""
    def compute() -> list[dict]:
        return [asdict(s) for s in score_candidates(model, candidates, prompts["harmful_val"], prompts["harmless_val"],
                                                    batch_size=settings.batch_size, progress=progress)]

    scores = [CandidateScore(**s) for s in cached(cache, "selection", "scores", _selection_key(settings), compute)]
    return scores, selected_direction(model, candidates, select(scores))


def selected_direction(model: ModelHandle, candidates: CandidateDirections, best: CandidateScore
                       ) -> SelectedDirection:
    """The candidate ``best`` names (float32), with its scores and the model and weights it was found on."""
    return SelectedDirection(candidates.get(best.position, best.layer).float(), best.layer, best.position,
                             source_model=model.name, weights=weights_fingerprint(model), selection=asdict(best),
                             excluded_dims=candidates.excluded_dims, n_positive=candidates.n_positive,
                             n_negative=candidates.n_negative)


def _intervention(model: ModelHandle, condition: str, selected: SelectedDirection) -> ContextManager:
    """The hooks of ``condition``: the direction ablated or added; none for the baseline and for the edited
    weights."""
    if condition == "ablation":
        return ablate(model, selected.vector)
    if condition == "actadd":
        return add(model, selected.vector, selected.layer)
    return contextlib.nullcontext()


def _generate(model: ModelHandle, settings: RefusalSettings, group_prompts: list[str], condition: str,
              selected: SelectedDirection, progress: bool) -> list[str]:
    with _intervention(model, condition, selected):
        return generate(model, group_prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                        progress=progress)


def completions(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                selected: SelectedDirection, conditions: Sequence[str] = BEFORE_EDIT, cache: StepCache | None = None,
                progress: bool = True) -> dict[str, list[str]]:
    """Step 3: greedy completions of every evaluation set's instructions under each of ``conditions`` that applies
    to them (:data:`CONDITIONS`), by ``{group}_{condition}``: ``baseline`` (the model as it is), ``ablation`` (the
    direction projected out of every residual write), ``actadd`` (the direction added at its layer), and
    ``orthogonalized`` (the model as it is once :func:`edit` has run). Cached in ``cache/completions/``."""
    return {f"{group}_{condition}": cached(
        cache, "completions", f"{group}_{condition}", _completions_key(settings, group, condition, selected),
        functools.partial(_generate, model, settings, prompts[group], condition, selected, progress))
        for group, condition in _jobs(settings, conditions)}


def evaluation(settings: RefusalSettings, prompts: dict[str, list[str]], texts: dict[str, list[str]]
               ) -> dict[str, dict]:
    """Step 4: each evaluation set's completions judged by ``settings.judge``: ``{set: {"refusal_score": {key:
    rate}, "refusal_rate": ..., "comparisons": ...}}`` (:func:`rate_statistics`), for the conditions ``texts``
    holds. Not cached: judging needs no model, and a judge function has no key to store it under."""
    judged = {}
    for name in settings.eval_sets:
        groups = EVAL_SETS[name]
        refused = {f"{kind}_{condition}": refusals(prompts[groups[kind]], texts[f"{groups[kind]}_{condition}"],
                                                   settings.judge)
                   for kind, conditions in CONDITIONS.items() for condition in conditions
                   if f"{groups[kind]}_{condition}" in texts}
        judged[name] = {"refusal_score": {k: sum(v) / len(v) for k, v in refused.items()},
                        **rate_statistics(refused)}
    return judged


def ablation_kl(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                selected: SelectedDirection) -> float:
    """Mean KL(baseline || ablated) of the next token on the first evaluation set's harmless instructions: what
    ablating the direction costs where there is nothing to refuse."""
    harmless = prompts[_first_set(settings)["harmless"]]
    base = next_token_logprobs(model, harmless, settings.batch_size)
    with ablate(model, selected.vector):
        return float(kl_divergence(base, next_token_logprobs(model, harmless, settings.batch_size)).mean())


def answer_losses(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                  selected: SelectedDirection, texts: dict[str, list[str]], conditions: Sequence[str]
                  ) -> dict[str, float]:
    """The teacher-forced loss of the model's own baseline answers to the first evaluation set's harmless
    instructions under each of ``conditions`` (baseline, ablation; orthogonalized once :func:`edit` has run): how
    much an edit disturbs ordinary answers."""
    group = _first_set(settings)["harmless"]
    losses = {}
    for condition in conditions:
        with _intervention(model, condition, selected):
            losses[condition] = answer_loss(model, prompts[group], texts[f"{group}_baseline"])
    return losses


def edit(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
         selected: SelectedDirection) -> dict:
    """Step 5: the direction removed from the weights in place (:func:`steering.orthogonalize.orthogonalize`), and
    how far the edited model is from the hooks on the first evaluation set's instructions: the largest next-token
    logit difference (also relative to the largest logit) and the mean KL(hooks || weights); ~0 on exact
    architectures (float32 rounding), what the edit costs on post-norm ones (Gemma-2/3, OLMo-2)."""
    groups = _first_set(settings)
    held_out = prompts[groups["harmful"]] + prompts[groups["harmless"]]
    return orthogonalize_against_hooks(model, selected.vector, held_out, settings.batch_size)


def save_selection(out: str | Path, selected: SelectedDirection, scores: Sequence[CandidateScore],
                   overwrite: bool = False) -> Path:
    """The selected direction (``OUT/direction.safetensors`` and ``direction.json``, see
    :class:`steering.directions.SelectedDirection`) and every candidate's scores (``OUT/selection.json``), read
    back by :func:`load_selection`. A folder holding a previous selection is refused unless ``overwrite``."""
    out = prepare_run_folder(out, SELECTION_OUTPUTS, overwrite)
    selected.save(out)
    atomic_write_json(out / "selection.json", [asdict(s) for s in scores])
    return out


def load_selection(out: str | Path, model: ModelHandle) -> SelectedDirection:
    """The direction :func:`save_selection` saved in ``out`` (float32, on the model's device); refused if ``out``
    has none or it was selected on other weights than ``model``'s."""
    path = Path(out) / DIRECTION_FILE
    if not path.is_file():
        raise WorkbenchError(f"{out} holds no selected direction: run notebooks/02_refusal_direction.ipynb with "
                             f"OUT = {str(out)!r} first, or python -m steering.refusal --out {out} (either selects "
                             "the direction and saves it there)")
    selected = SelectedDirection.load(path)
    if selected.weights != weights_fingerprint(model):
        raise WorkbenchError(f"the direction in {out} was selected on {selected.source_model}, not on "
                             f"{model.name}'s weights: rerun notebook 02 with MODEL = {model.name!r}")
    return replace(selected, vector=selected.vector.to(model.device, torch.float32))


def save(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]], selected: SelectedDirection,
         scores: Sequence[CandidateScore], texts: dict[str, list[str]], edited: dict) -> Path:
    """Step 6: the selection (:func:`save_selection`), the completions with their instructions
    (``OUT/completions.json``, by ``{group}_{condition}``) and the edited model (``OUT/checkpoint``, a
    ``save_pretrained`` folder); returns the checkpoint's path."""
    out = Path(settings.out)
    save_selection(out, selected, scores, settings.overwrite)
    atomic_write_json(out / "completions.json", {
        f"{group}_{condition}": [{"instruction": i, "completion": c}
                                 for i, c in zip(prompts[group], texts[f"{group}_{condition}"], strict=True)]
        for group, condition in _jobs(settings, BEFORE_EDIT + AFTER_EDIT)}, indent=1)
    groups = _first_set(settings)
    n_held_out = len(prompts[groups["harmful"]]) + len(prompts[groups["harmless"]])
    return save_checkpoint(model, out / "checkpoint", selected.vector, selected.layer, selected.position,
                           overwrite=settings.overwrite,
                           notes=f"Selected by `python -m steering.refusal` on {model.name}. Mean KL(hooks || "
                                 f"weights) of the next token on {n_held_out} held-out prompts: "
                                 f"{edited['kl_orthogonalized_vs_hooks']:.3g}.")


# ------------------------------------------------------------------------------------------------------ analyses
def _unit(vector: torch.Tensor) -> torch.Tensor:
    vector = vector.double()
    return vector / vector.norm().clamp_min(1e-12)


def expression(model: ModelHandle, instructions: Sequence[str], direction: torch.Tensor, layers: Sequence[int],
               excluded_dims: Sequence[int] = ()) -> torch.Tensor:
    """:func:`expression_of_ids` of the instructions in the chat template: [n, len(layers)] float64."""
    return expression_of_ids(model, chat_token_ids(model, instructions), direction, layers, excluded_dims)


def expression_of_ids(model: ModelHandle, ids: Sequence[Sequence[int]], direction: torch.Tensor,
                      layers: Sequence[int], excluded_dims: Sequence[int] = ()) -> torch.Tensor:
    """Cosine between ``direction`` and the last-token residual stream entering each of ``layers`` (read by
    :func:`probes.cache.extract`), with the dimensions the direction leaves out left out of the activations too:
    [n, len(layers)] float64."""
    acts = extract(model, ids, hooks=[f"blocks.{layer}.hook_resid_pre" for layer in layers], positions="last",
                   progress=False).acts.double().cpu()  # [n, L, d]
    acts[..., list(excluded_dims)] = 0
    return (acts @ _unit(direction).cpu()) / acts.norm(dim=-1).clamp_min(1e-12)


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """mean(a) - mean(b) of two independent samples with a 95% normal (Welch) interval."""
    a, b = a.double(), b.double()
    diff = float(a.mean() - b.mean())
    se = float((a.var() / len(a) + b.var() / len(b)).sqrt()) if min(len(a), len(b)) > 1 else float("nan")
    low, high = diff - Z95 * se, diff + Z95 * se
    return {"difference": diff, "ci95": [low, high], "excludes_zero": bool(low > 0 or high < 0),
            "n": [len(a), len(b)]}


def expression_by_layer(model: ModelHandle, harmful: Sequence[str], harmless: Sequence[str],
                        selected: SelectedDirection, layers: Sequence[int]) -> dict:
    """:func:`expression` of ``selected`` on harmful and harmless instructions: mean and standard deviation per
    layer, and harmful minus harmless at the selected layer with its interval."""
    cos = {kind: expression(model, texts, selected.vector, layers, selected.excluded_dims)
           for kind, texts in (("harmful", harmful), ("harmless", harmless))}
    at = list(layers).index(selected.layer) if selected.layer in layers else len(layers) // 2
    return {"layers": list(layers),
            **{kind: {"mean": c.mean(0).tolist(), "std": c.std(0).tolist(), "n": len(c)} for kind, c in cos.items()},
            "at_layer": layers[at], "harmful_minus_harmless": mean_difference(cos["harmful"][:, at],
                                                                              cos["harmless"][:, at])}


def candidate_cosines(candidates: CandidateDirections) -> dict:
    """Cosine of every non-zero candidate with every other: ``labels`` [[position, layer], ...] and ``matrix``."""
    labels = [[p, layer] for p in candidates.positions for layer in candidates.layers
              if candidates.get(p, layer).norm() > 1e-6]
    units = torch.stack([_unit(candidates.get(*label)).cpu() for label in labels])
    return {"labels": labels, "matrix": (units @ units.T).tolist()}


def geometry(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
             candidates: CandidateDirections, selected: SelectedDirection, cache: StepCache | None = None) -> dict:
    """Where the direction is expressed: :func:`expression_by_layer` on the first evaluation set's instructions
    and the cosines between candidates (:func:`candidate_cosines`). Cached in ``cache/geometry/``."""
    groups = _first_set(settings)

    def compute() -> dict:
        return {"expression": expression_by_layer(model, prompts[groups["harmful"]], prompts[groups["harmless"]],
                                                  selected, candidates.layers),
                "candidate_cosines": candidate_cosines(candidates)}

    key = {**_selection_key(settings), "direction": [selected.layer, selected.position], "groups": groups,
           "n": settings.n_test}
    return cached(cache, "geometry", "geometry", key, compute)


def base_model_name(settings: RefusalSettings) -> str | None:
    """The model the organism was trained from (``auto``: ``embedded`` for ``embedded-refuser``), or None."""
    name = settings.base_model
    if name == "auto":
        return "embedded" if settings.model == "embedded-refuser" else None
    return None if name == "none" else name


def _base_generations(base: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                      selected: SelectedDirection, cache: StepCache | None) -> dict[str, list[bool]]:
    """The base model's completions of the first evaluation set under each condition, judged."""
    refused = {}
    for kind, group in _first_set(settings).items():
        for condition in BEFORE_EDIT:
            if condition in CONDITIONS[kind]:
                texts = cached(cache, "base_model", f"{group}_{condition}",
                               _completions_key(settings, group, condition, selected),
                               functools.partial(_generate, base, settings, prompts[group], condition, selected, False))
                refused[f"{kind}_{condition}"] = refusals(prompts[group], texts, settings.judge)
    return refused


def base_model_comparison(base: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                          candidates: CandidateDirections, selected: SelectedDirection,
                          cache: StepCache | None = None) -> dict:
    """Does the direction exist before refusal training? On ``base``: the organism's direction read in its
    activations (:func:`expression_by_layer`), the base's own difference in means at the selected position against
    the organism's, per layer (cosine), and the base's refusal rates with the organism's direction ablated and
    added (:func:`rate_statistics`). Cached in ``cache/base_model/`` under the base model's weights."""
    if base.hf_model.config.get_text_config().hidden_size != selected.vector.shape[-1]:
        raise WorkbenchError(f"base model {base.name} has another width than {selected.source_model}")
    base_cache = cache and StepCache(cache.root, {"model": base.name, "weights": weights_fingerprint(base)})
    groups = _first_set(settings)

    def compute() -> dict:
        own = diff_in_means(base, prompts["harmful_train"], prompts["harmless_train"], positions=[selected.position],
                            layers=candidates.layers, outlier_ratio=settings.outlier_ratio, progress=False)
        return {"expression": expression_by_layer(base, prompts[groups["harmful"]], prompts[groups["harmless"]],
                                                  selected, candidates.layers),
                "direction_cosine": {"layers": candidates.layers, "position": selected.position, "cosine": [
                    float(_unit(own.get(selected.position, layer)) @ _unit(candidates.get(selected.position, layer)))
                    for layer in candidates.layers]}}

    key = {**_selection_key(settings), "direction": [selected.layer, selected.position], "groups": groups,
           "n": settings.n_test, "organism": cache.base if cache else None}
    result = cached(base_cache, "base_model", "geometry", key, compute)
    return {"model": base.name, **result,
            **rate_statistics(_base_generations(base, settings, prompts, selected, base_cache))}


def general_texts(n: int) -> dict[str, list[str]]:
    """The first ``n`` distinct Wikipedia passages of NQ-Swap (its original contexts) and ``n`` headlines."""
    return {source: list(texts[:n]) for source, texts in _general_corpus().items()}


@functools.cache
def _general_corpus() -> dict[str, tuple[str, ...]]:
    """All the general texts, read once per process (a run scores them before and after the edit)."""
    return {"wikipedia": tuple(dict.fromkeys(load_nqswap()["org_context"].astype(str))),
            "headlines": tuple(pd.read_csv(DATA_DIR / "headlines.csv.gz")["headline"].astype(str))}


@torch.inference_mode()
def text_losses(model: ModelHandle, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 16
                ) -> list[float]:
    """Mean teacher-forced cross-entropy per token of each raw text (no chat template, cut to ``max_tokens``
    tokens; :func:`probes.forward.answer_nll`); texts of fewer than two tokens are refused."""
    ids = text_token_ids(model, texts, max_tokens)
    if not ids or min(map(len, ids)) < 2:
        raise ValueError("need texts of at least two tokens each")
    losses: list[float] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        batch = answer_batch([([], row) for row in chunk], pad_id(model), model.device)
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = answer_nll(logits, batch["labels"], reduction="none")
        losses += [float(x.double().mean()) for x in nll.split([len(row) - 1 for row in chunk])]
    return losses


def general_loss(model: ModelHandle, settings: RefusalSettings, selected: SelectedDirection,
                 conditions: Sequence[str], cache: StepCache | None = None) -> dict[str, dict[str, list[float]]]:
    """The loss of each general text (:func:`general_texts`, ``n_general`` each; :func:`text_losses`) under each
    of ``conditions`` (baseline, ablation, actadd with hooks; orthogonalized once :func:`edit` has run), by source
    and condition; :func:`loss_summary` summarizes them. Cached in ``cache/general_loss/``."""
    results: dict[str, dict[str, list[float]]] = {}
    for source, texts in general_texts(settings.n_general).items():
        per_text = {}
        for condition in conditions:
            key = {"source": source, "n": settings.n_general, "max_tokens": settings.general_tokens,
                   **({} if condition == "baseline" else {**_selection_key(settings),
                                                          "direction": [selected.layer, selected.position]})}

            def compute(condition=condition, texts=texts) -> list[float]:
                with _intervention(model, condition, selected):
                    return text_losses(model, texts, settings.general_tokens, settings.batch_size)

            per_text[condition] = cached(cache, "general_loss", f"{source}_{condition}", key, compute)
        results[source] = per_text
    return results


def loss_summary(per_text: dict[str, list[float]]) -> dict:
    """Per condition ``{"loss", "ci95", "n"}`` (mean per-text loss, bootstrap over the texts) and each edit minus
    the baseline on the same texts (paired bootstrap)."""
    zeros = [0.0] * len(per_text["baseline"])
    summary = {}
    for condition, losses in per_text.items():
        boot = paired_bootstrap(losses, zeros)
        summary[condition] = {"loss": boot["difference"], "ci95": boot["ci95"], "n": boot["n"]}
        if condition != "baseline":
            summary[f"{condition}_minus_baseline"] = paired_bootstrap(losses, per_text["baseline"])
    return summary


def length_sensitivity(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
                       texts: dict[str, list[str]]) -> dict:
    """How much the refusal rate moves with the completion length: each completion judged on its first
    ``short_tokens`` tokens (greedy decoding: what a run with that ``max_new_tokens`` generates) and in full, per
    evaluation set and condition, with the paired difference (full minus short)."""
    def prefix(text: str) -> str:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:settings.short_tokens]
        return model.tokenizer.decode(ids, skip_special_tokens=True)

    result = {"short_tokens": settings.short_tokens, "max_new_tokens": settings.max_new_tokens}
    for name in settings.eval_sets:
        rates = {}
        for kind, group in EVAL_SETS[name].items():
            for condition in CONDITIONS[kind]:
                if f"{group}_{condition}" in texts:
                    full = texts[f"{group}_{condition}"]
                    short = refusals(prompts[group], [prefix(t) for t in full], settings.judge)
                    long = refusals(prompts[group], full, settings.judge)
                    rates[f"{kind}_{condition}"] = {"short": rate_with_interval(short),
                                                    "full": rate_with_interval(long),
                                                    "full_minus_short": paired_bootstrap(long, short)}
        result[name] = rates
    return result


def safety(settings: RefusalSettings, prompts: dict[str, list[str]], texts: dict[str, list[str]],
           judge: Callable[[str, str], bool]) -> dict[str, dict]:
    """Each evaluation set's harmful completions judged safe or not by ``judge`` (:class:`SafetyJudge`):
    ``{set: {"safety_score": {key: rate}, "safety_rate": {key: rate with interval}}}``."""
    judged = {}
    for name in settings.eval_sets:
        group = EVAL_SETS[name]["harmful"]
        safe = {f"harmful_{c}": [bool(judge(i, t)) for i, t in zip(prompts[group], texts[f"{group}_{c}"], strict=True)]
                for c in CONDITIONS["harmful"] if f"{group}_{c}" in texts}
        judged[name] = {"safety_score": {k: sum(v) / len(v) for k, v in safe.items()},
                        "safety_rate": {k: rate_with_interval(v) for k, v in safe.items()}}
    return judged


# ----------------------------------------------------------------------------------------------------------- run
def _refuse_offloaded(model: ModelHandle) -> ModelHandle:
    if is_offloaded(model.hf_model):
        raise WorkbenchError(
            f"model {model.name!r} has weights offloaded to the CPU or disk (--max-memory/--offload-folder), and this "
            "pipeline ends by orthogonalizing the weights in memory, which offloaded weights do not allow. Spread the "
            "model over GPUs only (--device-map auto with enough GPU memory), or run the steps up to the selection "
            "in Python (candidate_directions, selection, save_selection, as notebook 02 does) and edit the checkpoint "
            "on disk: python -m steering.orthogonalize --checkpoint PATH --direction OUT/direction.safetensors "
            "--out EDITED")
    return model


def _selection_summary(candidates: CandidateDirections, scores: Sequence[CandidateScore],
                       selected: SelectedDirection) -> dict:
    return {"direction": {"layer": selected.layer, "position": selected.position}, "selection": selected.selection,
            "n_candidates": len(scores), "n_kept": sum(s.kept for s in scores),
            "kl_filter_relaxed": not selected.selection["kept"], "excluded_dims": candidates.excluded_dims}


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str):
    """Adds the wall time of the block to ``seconds[step]``."""
    start = time.perf_counter()
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start


def _analyses(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
              candidates: CandidateDirections, selected: SelectedDirection, cache: StepCache, took: dict,
              base: ModelHandle | None) -> dict:
    """The steps on the unedited weights beside the pipeline's: geometry, the base model, the general-text loss
    with hooks (each skipped as the settings say); their results.json keys."""
    extra: dict[str, Any] = {}
    if settings.geometry:
        with _timed(took, "geometry"):
            extra["geometry"] = geometry(model, settings, prompts, candidates, selected, cache)
    name = base_model_name(settings)
    if base is not None or name:
        with _timed(took, "base_model"):
            base = base or load_model(name, **settings.load_kwargs())
            extra["base_model"] = base_model_comparison(base, settings, prompts, candidates, selected, cache)
    if settings.n_general:
        with _timed(took, "general_loss"):
            extra["general_loss"] = general_loss(model, settings, selected, BEFORE_EDIT, cache)
    return extra


def _judged(model: ModelHandle, settings: RefusalSettings, prompts: dict[str, list[str]],
            texts: dict[str, list[str]], took: dict) -> tuple[dict, dict]:
    """Step 4 on every completion, with the safety judge and the shorter completions when the settings ask."""
    judged, extra = evaluation(settings, prompts, texts), {}
    if settings.short_tokens and settings.short_tokens < settings.max_new_tokens:
        with _timed(took, "length_sensitivity"):
            extra["length_sensitivity"] = length_sensitivity(model, settings, prompts, texts)
    if settings.safety_judge:
        with _timed(took, "safety"):
            classifier = SafetyJudge.load(settings.safety_judge, model.device, model.dtype)
            scored = safety(settings, prompts, texts, classifier)
        for name, entry in scored.items():
            judged[name] |= entry
    return judged, extra


def run(settings: RefusalSettings, model: ModelHandle | None = None, progress: bool = True,
        base: ModelHandle | None = None) -> dict:
    """The pipeline as ``settings`` say, into the run folder ``settings.out``: the six steps (module docstring)
    and the analyses (geometry, the base model ``base`` or ``settings.base_model``, the general-text loss, the
    completion length, the safety judge), then ``OUT/results.json`` (docs/results.md), the figures and the report
    page ``OUT/index.html``. ``model``: already loaded (default: ``settings.model``, loaded once the folder is
    accepted); its weights are orthogonalized in place. A folder holding a previous run's outputs is refused unless
    ``settings.overwrite``, which removes them first (:func:`probes.files.prepare_run_folder`); ``OUT/cache`` stays
    and resumes the run."""
    if model is not None:
        _refuse_offloaded(model)  # before the folder is touched
    out = prepare_run_folder(settings.out, OUTPUTS, settings.overwrite)  # refused before the model loads
    model = model or _refuse_offloaded(load_model(settings.model, **settings.load_kwargs()))
    cache, prompts, start, took = StepCache.of(settings, model), instructions(settings), time.perf_counter(), {}
    with _timed(took, "candidate_directions"):
        candidates = candidate_directions(model, settings, prompts, cache, progress)  # 1
    with _timed(took, "selection"):
        scores, selected = selection(model, settings, prompts, candidates, cache, progress)  # 2
    with _timed(took, "completions"):
        texts = completions(model, settings, prompts, selected, BEFORE_EDIT, cache, progress)  # 3, with hooks
    extra = _analyses(model, settings, prompts, candidates, selected, cache, took, base)
    kl = ablation_kl(model, settings, prompts, selected)  # 4: what the edits cost, on the unedited weights
    losses = answer_losses(model, settings, prompts, selected, texts, ("baseline", "ablation"))
    edited = edit(model, settings, prompts, selected)  # 5
    texts |= completions(model, settings, prompts, selected, AFTER_EDIT, cache, progress)  # 3, edited weights
    losses |= answer_losses(model, settings, prompts, selected, texts, AFTER_EDIT)
    if settings.n_general:
        with _timed(took, "general_loss"):
            after = general_loss(model, settings, selected, AFTER_EDIT, cache)
            extra["general_loss"] = {source: loss_summary(per_text | after[source])
                                     for source, per_text in extra["general_loss"].items()}
    judged, judged_extra = _judged(model, settings, prompts, texts, took)  # 4
    checkpoint = save(model, settings, prompts, selected, scores, texts, edited)  # 6
    results = {"model": model.name, "weights": cache.base["weights"], **judged[settings.eval_sets[0]],
               "kl_harmless_ablation": kl, **edited, "checkpoint": str(checkpoint),
               "loss_harmless_baseline_answers": losses, **_selection_summary(candidates, scores, selected),
               "evaluation": judged, **extra, **judged_extra, "selection_filters": {"kl_max": KL_MAX,
               "prune_last": PRUNE_LAST}, "settings": settings.to_dict(), "step_seconds": took,
               "seconds": time.perf_counter() - start}
    atomic_write_json(out / "results.json", results)
    refusal_plots.write_all(results, scores, out)
    return results


def main(argv: list[str] | None = None) -> dict:
    results = run(parse_settings(RefusalSettings, argv, __doc__))
    shown = ("direction", "refusal_score", "kl_harmless_ablation", "max_abs_logit_diff_orthogonalized_vs_hooks",
             "kl_orthogonalized_vs_hooks", "checkpoint")
    print(json.dumps({k: results[k] for k in shown}, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main, kept="the resumable cache in OUT/cache is kept: the same command resumes from the last finished "
                       "step")
