"""The methods SpARE is compared with (Zhao et al. 2025, Table 1), each as one entry of :data:`METHODS`: what it
sees, which way it can steer, the settings tuned on validation, and how it answers the conflict prompts of one seed
(:class:`SeedRun`).

| method | kind | sees at test time beyond the prompt |
|---|---|---|
| ``no_edit`` | the model as it is | |
| ``closed_book`` | reference: the prompt without its context (the ceiling toward memory) | a context-free prompt |
| ``cad`` | contrastive decoding (Shi et al. 2024) | a context-free prompt |
| ``dola`` | contrastive decoding across layers (Chuang et al. 2024) | |
| ``icl`` | demonstrations of the wanted behaviour | demonstrations of the wanted behaviour |
| ``taskvec`` | representation engineering (Hendel et al. 2023) | |
| ``sea`` | representation engineering, linear (Qiu et al. 2024) | |
| ``actadd`` | representation engineering: difference of the behaviour groups' means | |
| ``spare`` | SpARE: SAE latents chosen by mutual information | |

Every method except ``closed_book``, ``cad`` and ``icl`` answers the same prompt as ``no_edit``; the verdict on
SpARE's claim compares those (:data:`SAME_INPUT`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from probes.conflict import ConflictExample, Demonstration, conflict_prompts
from probes.forward import text_token_ids
from probes.models import ModelHandle
from steering import contrastive_decoding as cd
from steering import representation_baselines as rb
from steering.spare import (
    ANSWER_BATCH,
    FittedSteering,
    SpareSettings,
    Target,
    edit_last_token,
    steered_answers,
)

TARGETS: tuple[Target, ...] = ("context", "memory")
Setting = dict  # one point of a method's validation grid, e.g. {"alpha": 0.5}


@dataclass
class SeedRun:
    """What one seed of the protocol fixes before any method answers: the demonstrations (the prompt's, and those
    showing each behaviour), the fitted SpARE latents and activation-addition directions, and the activations
    the other representation methods are fitted from (by hook point; training prompts, last token)."""

    seed: int
    settings: SpareSettings
    demonstrations: dict[str, list[Demonstration]]  # "plain", "context", "memory"
    fitted: FittedSteering
    acts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # prompt kind -> hook -> [n, d]
    taskvec_hooks: dict[int, str] = field(default_factory=dict)  # layer -> hook
    n_layers: int = 0

    def prompts(self, examples: Sequence[ConflictExample], kind: str) -> list[str]:
        """``plain``: the substituted context with the prompt's demonstrations; ``closed_book``: the same without
        any context; ``context`` / ``memory``: the substituted context with demonstrations of that behaviour."""
        if kind == "closed_book":
            return conflict_prompts(examples, "none", self.demonstrations["plain"])
        return conflict_prompts(examples, "sub", self.demonstrations[kind])


Answer = Callable[[ModelHandle, SeedRun, Sequence[ConflictExample], Target, Setting], list[str]]


@dataclass(frozen=True)
class Method:
    """One method of the comparison."""

    name: str
    label: str
    answer: Answer
    grid: Callable[[SpareSettings, SeedRun], list[Setting]]  # the grid points tried on validation
    targets: tuple[Target, ...] = TARGETS
    not_applicable: str = ""  # why it cannot steer toward the other target
    extra_input: str = ""     # what it sees at test time beyond the prompt the others answer

    def check_target(self, target: Target) -> None:
        if target not in self.targets:
            raise ValueError(f"{self.name} cannot steer toward the {target}: {self.not_applicable}")


def _generate(model: ModelHandle, run: SeedRun, prompts: list[str], edits=None) -> list[str]:
    return steered_answers(model, prompts, edits or {}, run.settings.max_new_tokens,
                           generated=run.settings.edit_generated)


def _no_edit(model, run, examples, target, setting) -> list[str]:
    return _generate(model, run, run.prompts(examples, "plain"))


def _closed_book(model, run, examples, target, setting) -> list[str]:
    return _generate(model, run, run.prompts(examples, "closed_book"))


def _icl(model, run, examples, target, setting) -> list[str]:
    return _generate(model, run, run.prompts(examples, target))


def _cad(model, run, examples, target, setting) -> list[str]:
    with_context = text_token_ids(model, run.prompts(examples, "plain"))
    without = text_token_ids(model, run.prompts(examples, "closed_book"))
    first, second = (with_context, without) if target == "context" else (without, with_context)
    return cd.contrastive_generate(model, first, second, setting["alpha"], run.settings.max_new_tokens,
                                   ANSWER_BATCH, progress=False)


def _dola(model, run, examples, target, setting) -> list[str]:
    return cd.dola_generate(model, text_token_ids(model, run.prompts(examples, "plain")), setting["bucket"],
                            run.settings.max_new_tokens, ANSWER_BATCH, progress=False)


def _taskvec(model, run, examples, target, setting) -> list[str]:
    hook = run.taskvec_hooks[setting["layer"]]
    vector = rb.task_vector(run.acts[target][hook])
    with edit_last_token(model, {hook: rb.replace_edit(vector)}, generated=False):
        return _generate(model, run, run.prompts(examples, "plain"))


def _sea(model, run, examples, target, setting) -> list[str]:
    other = "memory" if target == "context" else "context"
    edits = {hook: rb.fit_sea(run.acts["plain"][hook], run.acts[target][hook], run.acts[other][hook],
                              setting["keep"]).edit(1.0)
             for hook in run.fitted.hooks.values()}
    return _generate(model, run, run.prompts(examples, "plain"), edits)


def _actadd(model, run, examples, target, setting) -> list[str]:
    edits = run.fitted.edits("actadd", target, setting["strength"])
    return _generate(model, run, run.prompts(examples, "plain"), edits)


def _spare(model, run, examples, target, setting) -> list[str]:
    edits = run.fitted.edits("spare", target, setting["strength"], setting.get("remove", True), run.settings.edit_rule)
    return _generate(model, run, run.prompts(examples, "plain"), edits)


def _one(settings, run) -> list[Setting]:
    return [{}]


def _spare_grid(settings, run) -> list[Setting]:
    removes = (True, False) if settings.edit_rule == "workbench" else (True,)
    return [{"strength": a, "remove": r} for a in settings.strengths for r in removes]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("no_edit", "no edit", _no_edit, _one),
    Method("closed_book", "closed book (reference)", _closed_book, _one, ("memory",),
           "without its context the prompt has nothing to follow: it is the reference toward memory only",
           "a context-free prompt"),
    Method("cad", "CAD", _cad, lambda s, r: [{"alpha": a} for a in s.cad_alphas], extra_input="a context-free prompt"),
    Method("dola", "DoLa", _dola, lambda s, r: [{"bucket": b} for b in s.dola_buckets], ("memory",),
           "DoLa sharpens what the last layers add to the early ones (factual recall); it has no knob that favours "
           "the context"),
    Method("icl", "ICL", _icl, _one, extra_input="demonstrations of the wanted behaviour"),
    Method("taskvec", "TaskVec", _taskvec, lambda s, r: [{"layer": layer} for layer in r.taskvec_hooks]),
    Method("sea", "SEA (linear)", _sea, lambda s, r: [{"keep": k} for k in s.sea_keep]),
    Method("actadd", "ActAdd", _actadd, lambda s, r: [{"strength": a} for a in s.strengths]),
    Method("spare", "SpARE", _spare, _spare_grid),
)}
SAME_INPUT = tuple(name for name, m in METHODS.items() if not m.extra_input)


def setting_label(setting: Setting) -> str:
    """A grid point as text, e.g. ``alpha 0.5``; ``default`` for a method without settings."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in setting.items()) or "default"
