"""SpARE (Zhao et al., NAACL 2025): steer which knowledge a model uses, its context or its memory, by editing the
SAE latents that carry the choice; compared, as the paper does, with contrastive decoding, in-context learning and
representation engineering.

    python -m steering.spare --model embedded --dataset known_facts --out runs/spare

This module holds SpARE itself and the command line. At each SAE's own hook point (``cfg.metadata.hook_name``: the
residual stream entering or leaving a block) the latents are ranked by mutual information with the behaviour
(:func:`behaviour_latents`) and split by which behaviour activates them more; the edit (:func:`spare_edit`) takes
away the undesired behaviour's latents and raises the desired one's toward their (confidence-weighted) expected
activation, at the last prompt token. The other methods are in :mod:`steering.spare_methods`; the protocol (seeds,
fitting, tuning on validation, test, summary over seeds, conflict probe) in :mod:`steering.spare_protocol`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch

from probes.cache import extract
from probes.cli_args import check_layers, choice_list, layer_list, non_negative_int, number_list, positive_int, run_cli
from probes.cli_args import proportion as proportion_arg
from probes.conflict import (
    ANSWER_BATCH,
    ConflictExample,
)
from probes.files import prepare_run_folder
from probes.forward import generate, in_shared_prefix
from probes.models import ModelHandle, layer_count, load_model
from probes.settings import ModelSettings, RunSettings, parse_settings, setting
from steering.hooks import replace_residual
from steering.mutual_info import mutual_information, select_by_share, select_latents

Target = Literal["context", "memory"]
# Methods of the comparison, in table order (steering.spare_methods.METHODS holds what each one is).
METHOD_NAMES = ("no_edit", "closed_book", "cad", "dola", "icl", "taskvec", "sea", "actadd", "spare")
# Edit strengths tried on the validation split (SpARE's α and activation addition's coefficient).
STRENGTHS = (0.5, 1.0, 2.0)
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BehaviourLatents:
    """The latents of one SAE chosen for each behaviour, with their expected activations per behaviour group."""

    layer: int
    mi: torch.Tensor            # [d_sae] mutual information with the behaviour label (nats)
    context: torch.Tensor       # indices of selected latents more active when the model uses the context
    memory: torch.Tensor        # ... when it uses its memory
    mean_context: torch.Tensor  # [d_sae] mean activation over prompts answered from the context
    mean_memory: torch.Tensor   # [d_sae] ... from memory


def _weighted_mean(z: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of the rows of ``z`` [n, d_sae], weighted by ``weights`` [n] (normalised here) if given."""
    if weights is None:
        return z.mean(0)
    w = torch.as_tensor(weights, dtype=z.dtype, device=z.device)
    if w.shape != (len(z),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(z)} non-negative numbers, not all zero")
    return (w / w.sum()) @ z


@torch.no_grad()
def behaviour_latents(sae, acts: torch.Tensor, uses_context: torch.Tensor, layer: int,
                      proportion: float | None = None, mi_share: float | None = 0.07,
                      weights: torch.Tensor | None = None) -> BehaviourLatents:
    """Rank the SAE's latents on ``acts`` [n, d] (residual stream at the edited position) by mutual information
    with ``uses_context`` [n] (bool) and split the selected ones by the group in which each is more active.

    Selection: in order of MI until they hold ``mi_share`` of the total (the paper's rule,
    :func:`steering.mutual_info.select_by_share`), or, with ``proportion``, the top proportion by count. Targets:
    each group's mean activation, weighted by ``weights`` [n] within each group if given (the paper's confidence
    weights, :func:`confidence_weights`)."""
    uses_context = torch.as_tensor(uses_context, dtype=torch.bool, device=acts.device)
    if uses_context.all() or not uses_context.any():
        raise ValueError("need prompts of both behaviours (some answered from the context, some from memory)")
    if (proportion is None) == (mi_share is None):
        raise ValueError("give exactly one of proportion (top latents by count) and mi_share (share of total MI)")
    z = sae.encode(acts.to(sae.W_dec.dtype)).float()
    mi = mutual_information(z, uses_context)
    w = None if weights is None else torch.as_tensor(weights, device=z.device)
    mean_c = _weighted_mean(z[uses_context], None if w is None else w[uses_context])
    mean_m = _weighted_mean(z[~uses_context], None if w is None else w[~uses_context])
    if mi_share is not None:
        top = select_by_share(mi, mi_share, (mean_c - mean_m).to(mi.device)).to(z.device)
    else:
        top = select_latents(mi, proportion).to(z.device)
    favours_context = mean_c[top] > mean_m[top]
    return BehaviourLatents(layer, mi.cpu(), top[favours_context], top[~favours_context], mean_c, mean_m)


EDIT_RULES = ("paper", "workbench")


def spare_edit(sae, latents: BehaviourLatents, target: Target, strength: float = 1.0, remove: bool = True,
               rule: str = "paper") -> Edit:
    """``h -> delta`` through the SAE decoder, with z = the SAE's latents of h, ẑ the targets (expected
    activations), u the undesired behaviour's latents and d the desired one's:

    - ``rule="paper"`` (Zhao et al. 2025): take away min(α·ẑᵤ, zᵤ) and add max(α·ẑ_d − z_d, 0), α = ``strength``
      scaling the target;
    - ``rule="workbench"`` (this workbench's earlier variant): α·(max(ẑ_d − z_d, 0) − zᵤ), the removal skipped
      unless ``remove``."""
    if target not in ("context", "memory"):
        raise ValueError(f"target must be 'context' or 'memory', got {target!r}")
    if rule not in EDIT_RULES:
        raise ValueError(f"rule must be one of {EDIT_RULES}, got {rule!r}")
    # computed on the SAE's device, returned on the hidden state's (they differ on a model spread over devices)
    where = sae.W_dec.device
    keep, drop = (latents.context, latents.memory) if target == "context" else (latents.memory, latents.context)
    keep, drop = keep.to(where), drop.to(where)
    wanted, unwanted = ((latents.mean_context, latents.mean_memory) if target == "context"
                        else (latents.mean_memory, latents.mean_context))
    wanted, unwanted = wanted.to(where)[keep], unwanted.to(where)[drop]
    w_keep, w_drop = sae.W_dec[keep].detach().float(), sae.W_dec[drop].detach().float()

    @torch.no_grad()
    def edit(h: torch.Tensor) -> torch.Tensor:
        z = sae.encode(h.to(where, sae.W_dec.dtype)).float()
        if rule == "paper":
            delta = (strength * wanted - z[:, keep]).clamp(min=0) @ w_keep
            delta = delta - torch.minimum(strength * unwanted, z[:, drop]) @ w_drop
            return delta.to(h.device, h.dtype)
        delta = (wanted - z[:, keep]).clamp(min=0) @ w_keep
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
    counts as a generation step). The pass over a shared few-shot prefix (:func:`probes.forward.in_shared_prefix`)
    is left alone: its last token is not the prompt's."""
    def last_only(edit: Edit) -> Callable[[torch.Tensor], torch.Tensor]:
        def replace(hidden: torch.Tensor) -> torch.Tensor:
            if in_shared_prefix() or (not generated and hidden.shape[1] == 1):
                return hidden
            hidden = hidden.clone()
            hidden[:, -1] += edit(hidden[:, -1])
            return hidden
        return replace

    return replace_residual(model, {hook: last_only(edit) for hook, edit in edits.items()})


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
    """What SpARE and activation addition learn from the training split: the latents and the directions, one per
    SAE layer, and where each acts; :meth:`edits` turns them into edits."""

    saes: Mapping[int, object]
    hooks: dict[int, str]  # each SAE's own hook point: where activations were read and where the edits land
    latents: dict[int, BehaviourLatents]
    directions: dict[int, torch.Tensor]  # mean(uses context) - mean(uses memory), residual stream

    def edits(self, method: str, target: Target, strength: float, remove: bool = True, rule: str = "paper"
              ) -> dict[str, Edit]:
        """Edits at every SAE's hook point for ``method`` "spare" (:func:`spare_edit`) or "actadd" toward
        ``target``."""
        if method == "spare":
            return {self.hooks[layer]: spare_edit(self.saes[layer], latents, target, strength, remove, rule)
                    for layer, latents in self.latents.items()}
        if method == "actadd":
            sign = 1.0 if target == "context" else -1.0
            return {self.hooks[layer]: add_edit(d, sign * strength) for layer, d in self.directions.items()}
        raise ValueError(f"method must be 'spare' or 'actadd', got {method!r}")


def fit_steering(saes: Mapping[int, object], hooks: Mapping[int, str], acts: Mapping[str, torch.Tensor],
                 uses_context: torch.Tensor, proportion: float | None = None, mi_share: float | None = 0.07,
                 weights: torch.Tensor | None = None) -> FittedSteering:
    """SpARE's latents (:func:`behaviour_latents`) and activation addition's directions at each SAE's hook point,
    from the last-token activations ``acts`` (by hook point, [n, d]) of training prompts answered from the context
    (``uses_context``) or from memory."""
    latents, directions = {}, {}
    for layer in sorted(saes):
        x = acts[hooks[layer]]
        mask = torch.as_tensor(uses_context, dtype=torch.bool).to(x.device)
        latents[layer] = behaviour_latents(saes[layer], x, mask, layer, proportion, mi_share, weights)
        directions[layer] = x[mask].mean(0) - x[~mask].mean(0)
    return FittedSteering(saes, dict(hooks), latents, directions)


def steered_answers(model: ModelHandle, prompts: Sequence[str], edits: Mapping[str, Edit], max_new_tokens: int,
                    progress: bool = False, generated: bool = True) -> list[str]:
    """Greedy answers with ``edits`` (by hook point; none: the unedited model) applied, also to the generated tokens
    if ``generated``; the demonstrations every prompt starts with run once (their KV cache is reused)."""
    with edit_last_token(model, edits, generated):
        return generate(model, prompts, max_new_tokens, ANSWER_BATCH, progress, chat=False, first_line=True,
                        share_prefix=True)


def references(examples: Sequence[ConflictExample], target: Target) -> list[tuple[str, ...]]:
    """The answers that count as ``target`` behaviour: the substituted context's, or the memorised ones."""
    return [e.sub_answers if target == "context" else e.org_answers for e in examples]


# The paper's protocol (Zhao et al. 2025): the settings that differ from these are listed in results.json.
PAPER_PROTOCOL = {"demonstrations": "drawn", "shots": 3, "n_seeds": 5, "mi_share": 0.07, "proportion": None,
                  "targets": "confidence", "edit_rule": "paper", "edit_generated": False}


@dataclass(kw_only=True)
class SpareSettings(ModelSettings, RunSettings):
    """The conflict examples, the SAEs, the methods compared and how each is fitted and tuned (``seed``: the split
    and the sample of examples; the demonstrations are drawn with seeds 0 .. n_seeds - 1). The defaults are the
    paper's protocol (:data:`PAPER_PROTOCOL`)."""

    dataset: str = setting("known_facts", "conflict examples: the model's known facts (built once and cached in "
                                          "data/known_facts) or NQ-Swap", choices=("known_facts", "nqswap"))
    n_examples: int | None = setting(None, "examples used (default: all)", parse=positive_int)
    layers: list[int] | None = setting(None, "SAE layers to edit, e.g. 9,12 or 9-12 (default: every shipped SAE)",
                                       parse=layer_list)
    sae_dir: Path | None = setting(None, "folder of layer_<L> SAE folders (default: data/sae/<model>)", parse=Path)
    sae_release: str | None = setting(None, "SAELens release of pretrained SAEs, e.g. "
                                            "gemma-scope-2b-pt-res-canonical")
    sae_id: str | None = setting(None, "SAE id with {layer}, e.g. 'layer_{layer}/width_16k/canonical'")
    methods: list[str] = setting(list(METHOD_NAMES), "methods compared, comma-separated",
                                 parse=choice_list(METHOD_NAMES, "methods"))
    directions: list[str] = setting(["context", "memory"], "directions to steer: context, memory or both",
                                    parse=choice_list(("context", "memory"), "directions"))
    n_seeds: int = setting(5, "seeds of the demonstrations; each reruns everything downstream of the prompts",
                           parse=positive_int)
    shots: int = setting(3, "in-context demonstrations per prompt, drawn per seed from the training facts",
                         parse=positive_int)
    demonstrations: str = setting("drawn", "the prompt's demonstrations: drawn per seed from the training facts "
                                           "(the paper), or fixed: the workbench's four hand-written ones",
                                  choices=("drawn", "fixed"))
    mi_share: float = setting(0.07, "SpARE takes latents in order of mutual information until they hold this share "
                                    "of the total", parse=proportion_arg)
    proportion: float | None = setting(None, "instead of --mi-share: the top proportion of latents by count (the "
                                             "workbench's earlier rule, e.g. 0.01)", parse=proportion_arg)
    targets: str = setting("confidence", "SpARE's target activations: confidence-weighted means (the paper) or "
                                         "plain means", choices=("confidence", "mean"))
    edit_rule: str = setting("paper", "paper: remove min(a*z_u_hat, z_u), add max(a*z_d_hat - z_d, 0); workbench: "
                                      "a*(max(z_d_hat - z_d, 0) - z_u), also tried without the removal",
                             choices=EDIT_RULES)
    edit_generated: bool = setting(False, "edit every generated token too (the paper edits the last prompt token)")
    strengths: list[float] = setting(list(STRENGTHS), "SpARE's a and activation addition's coefficient tried on "
                                                      "validation, e.g. 0.5,2", parse=number_list)
    cad_alphas: list[float] = setting([0.5, 1.0, 2.0], "CAD's a tried on validation", parse=number_list)
    dola_buckets: list[str] = setting(["low", "high"], "DoLa's candidate premature layers tried on validation: the "
                                                       "low and/or high half of the layers",
                                      parse=choice_list(("low", "high"), "DoLa buckets"))
    taskvec_layers: list[int] | None = setting(None, "layers TaskVec is patched in at, tried on validation "
                                                     "(default: about 30%, 45%, 60% of the depth)", parse=layer_list)
    sea_keep: list[float] = setting([0.9, 0.99], "SEA's share of the spectrum kept / removed, tried on validation",
                                    parse=number_list)
    probe_c: float = setting(0.1, "inverse L1 strength of the conflict probe (scikit-learn's C)", parse=float)
    tune_n: int | None = setting(None, "validation examples the settings are tuned on (default: all of the split)",
                                 parse=positive_int)
    max_new_tokens: int = setting(8, "tokens of each greedy answer", parse=positive_int)
    dashboard_tokens: int = setting(20_000, "tokens of held-out SAE-corpus text the dashboards of seed 0's selected "
                                            "latents are read from (OUT/latents, linked from the report; 0: none)",
                                    parse=non_negative_int)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_ranges()
        from steering.spare_methods import METHODS

        for name in self.methods:
            method = METHODS[name]
            if not set(method.targets) & set(self.directions):
                raise ValueError(f"{name} cannot steer toward the {' or '.join(self.directions)}: "
                                 f"{method.not_applicable}")
        if self.demonstrations == "fixed" and self.n_seeds > 1:
            raise ValueError("with fixed demonstrations every seed would answer the same prompts: use --n-seeds 1")

    def _check_ranges(self) -> None:
        checks = [("strengths", self.strengths, lambda v: v > 0, "> 0"),
                  ("cad_alphas", self.cad_alphas, lambda v: v >= 0, ">= 0"),
                  ("sea_keep", self.sea_keep, lambda v: 0 < v <= 1, "in (0, 1]"),
                  ("dola_buckets", self.dola_buckets, lambda v: v in ("low", "high"), "low or high")]
        for name, values, ok, rule in checks:
            bad = [v for v in values if not ok(v)]
            if bad or not values:
                raise ValueError(f"{name} must be {rule}, got {bad or values}")
        if self.probe_c <= 0:
            raise ValueError(f"probe_c must be > 0, got {self.probe_c}")
        if self.dashboard_tokens < 0:
            raise ValueError(f"dashboard_tokens must be >= 0, got {self.dashboard_tokens}")

    def protocol(self) -> dict:
        """"paper" when every setting of :data:`PAPER_PROTOCOL` is the paper's, else the ones that differ."""
        differ = {k: getattr(self, k) for k, v in PAPER_PROTOCOL.items() if getattr(self, k) != v}
        return {"name": "paper" if not differ else "custom", "differs_from_paper": differ}

    def check_examples(self, n: int) -> None:
        """Refuse, before the model loads, a number of examples too small to draw demonstrations from."""
        train = int(n * 0.6)
        if train < self.shots + 2 or int(n * 0.8) - train < 1:
            raise ValueError(f"{n} examples leave {train} for training: too few to draw {self.shots} demonstrations "
                             f"from and fit on the rest; use more --n-examples (at least {5 * (self.shots + 2)})")


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


def check_settings(settings: SpareSettings) -> None:
    """Everything that can be checked before the model loads: layers, SAE folders, the run folder, and enough
    examples for the demonstrations when their number is known."""
    if settings.n_examples is not None:
        settings.check_examples(settings.n_examples)
    check_layers(settings.layers, layer_count(settings.model), settings.model)
    sae_folders(settings.model, settings.layers, settings.sae_dir, settings.sae_release, settings.sae_id)
    prepare_run_folder(settings.out, run_outputs(), settings.overwrite)


def run_outputs() -> tuple[str, ...]:
    """What a run writes in its folder: the whole set is replaced by the next run (with overwrite)."""
    from steering.spare_plots import FIGURE_FILES

    return ("results.json", "plotly.min.js", "latents", *FIGURE_FILES)


def main(argv: list[str] | None = None) -> dict:
    from steering.spare_protocol import run

    settings = parse_settings(SpareSettings, argv, __doc__)
    check_settings(settings)  # refused before the model loads
    model = load_model(settings.model, **settings.load_kwargs())
    saes, examples = load_inputs(model, settings)
    results = run(model, examples, saes, settings)
    print(f"protocol: {results['protocol']['name']}; {results['n']['test']} test prompts, {settings.n_seeds} seed(s)")
    for target, rows in results["exact_match"].items():
        print(f"{target:17s} " + "  ".join(f"{m} {v['mean']:.3f}±{v['sd']:.3f}" for m, v in rows.items()))
    print(f"wrote {settings.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main, kept="results.json and the figures are written only at the end: nothing half-written is left")
