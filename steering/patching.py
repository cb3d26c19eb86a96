"""Activation patching: run a corrupted prompt with one site's activation taken from a clean prompt, for every site
of a grid, and measure how much of the clean behaviour each site restores.

Sites are blocks x token positions of one kind of activation: the residual stream entering (``resid_pre``) or leaving
(``resid_post``) a block, the attention or MLP output as added to the stream (``attn_out``, ``mlp_out``), or single
attention heads (``head``: head h's slice of the attention output projection's input, the bridge's ``attn.hook_z``),
patched at all positions at once or one position at a time (``by_position``).

Fast: the clean activations are captured in one forward pass, and the corrupted prompt runs as a batch of
``batch_size`` copies, each row patching another site, so a grid of N sites costs about N / batch_size forward passes
instead of N. The hooks sit on the plain model's modules that :mod:`probes.architecture` names; where it knows no
single module holding a block's attention or MLP output (families outside
:data:`probes.architecture.COMPONENT_OUTPUTS_CHECKED`, hybrids among them), those run through the bridge's
``blocks.<L>.hook_attn_out`` / ``hook_mlp_out``. Plots: :mod:`steering.patching_plots`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from probes.architecture import Rewrite, attention_output_projection, map_output
from probes.errors import WorkbenchError
from probes.forward import text_token_ids
from probes.models import ModelHandle
from probes.progress import progress_bar
from steering.hooks import replace_residual

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head")
ALIGNMENTS = ("first", "last")
Metric = Callable[[torch.Tensor], torch.Tensor]  # final-token logits [batch, vocab] -> one value per row [batch]
Prompt = str | Sequence[int] | torch.Tensor  # a text (tokenized with the tokenizer's special tokens) or token ids


@dataclass
class PatchingResult:
    """The metric of the corrupted prompt with each site patched from the clean one.

    ``values`` is [layers, positions] (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``), [layers, heads]
    (``head``) or [layers, heads, positions] (``head`` by position), float64; NaN where a position of the corrupted
    prompt has no aligned clean token. ``positions`` index the corrupted prompt; ``tokens`` and ``clean_tokens`` are
    the two prompts' tokens there (``None``: no aligned clean token)."""

    kind: str
    values: torch.Tensor
    layers: list[int]
    heads: list[int] | None
    positions: list[int]
    tokens: list[str]
    clean_tokens: list[str | None]
    clean_metric: float
    corrupted_metric: float

    @property
    def dims(self) -> tuple[str, ...]:
        """The names of the axes of ``values``."""
        if self.heads is None:
            return ("layer", "position")
        return ("layer", "head", "position") if self.values.dim() == 3 else ("layer", "head")

    def normalized(self) -> torch.Tensor:
        """(patched - corrupted) / (clean - corrupted): 0 where the site changes nothing, 1 where it restores the
        clean metric."""
        gap = self.clean_metric - self.corrupted_metric
        if gap == 0 or not math.isfinite(gap):
            raise WorkbenchError(f"the clean and corrupted prompts give the metric {self.clean_metric} and "
                                 f"{self.corrupted_metric}: no gap to normalise by; pick prompts that differ in it")
        return (self.values - self.corrupted_metric) / gap


def logit_difference(correct: int, wrong: int) -> Metric:
    """The metric ``logit[correct] - logit[wrong]`` of each row."""
    return lambda logits: logits[:, correct] - logits[:, wrong]


@dataclass(frozen=True)
class _Site:
    """One patch: block ``layer`` (head ``head``, or the whole activation) at the corrupted ``positions``."""

    layer: int
    head: int | None
    positions: tuple[int, ...]


@dataclass(frozen=True)
class _Route:
    """How one kind of activation is replaced: ``hook(stack, layer, fn)`` applies the :data:`Rewrite` ``fn`` to
    block ``layer``'s activation while ``stack`` is open; ``logits(ids)`` runs the model: final-token logits."""

    hook: Callable[[contextlib.ExitStack, int, Rewrite], None]
    logits: Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def patch(model: ModelHandle, clean: Prompt, corrupted: Prompt, kind: str = "resid_pre", *,
          answers: tuple[int, int] | None = None, metric: Metric | None = None,
          layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
          positions: Sequence[int] | None = None, by_position: bool = False, align: str | None = None,
          batch_size: int = 32, progress: bool = True) -> PatchingResult:
    """Patch ``kind`` from ``clean`` into ``corrupted`` at every site of ``layers`` x ``positions`` (heads: ``layers``
    x ``heads``, all ``positions`` at once, or x ``positions`` with ``by_position``), ``batch_size`` sites per forward
    pass.

    The metric is ``logit[correct] - logit[wrong]`` at the last token for ``answers=(correct, wrong)`` (token ids),
    or ``metric(logits [batch, vocab]) -> [batch]``. Defaults: every layer that has the component, every head, every
    position of the corrupted prompt (negative positions count from its end). Prompts of different lengths need
    ``align``: "last" pairs the last tokens (offsets counted from the end), "first" the first ones."""
    if kind not in KINDS:
        raise WorkbenchError(f"unknown patching kind {kind!r}; choose one of {', '.join(KINDS)}")
    score = _metric(model, answers, metric)
    clean_ids, corrupted_ids = _token_ids(model, clean, "clean"), _token_ids(model, corrupted, "corrupted")
    offset = _offset(len(clean_ids), len(corrupted_ids), align)
    if by_position and kind != "head":
        raise WorkbenchError(f"by_position applies to kind 'head'; {kind!r} is always patched one position at a time")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
    layers = _layers(model, kind, layers)
    heads = _heads(model, heads) if kind == "head" else None
    positions = _positions(positions, len(corrupted_ids))
    route = _route(model, kind, layers)
    acts, clean_logits = _capture(route, layers, _row(model, clean_ids))
    clean_metric = _scored(score, clean_logits)
    corrupted_metric = _scored(score, route.logits(_row(model, corrupted_ids)))
    shape, sites = _sites(layers, heads, positions, by_position, offset, len(clean_ids))
    values = torch.full(shape, math.nan, dtype=torch.float64)
    if sites:
        patched = _patched(route, score, acts, _row(model, corrupted_ids), [s for _, s in sites], offset,
                           model.bridge.cfg.n_heads if heads is not None else None, batch_size, progress)
        values.view(-1)[torch.tensor([i for i, _ in sites])] = patched
    decode = model.tokenizer.decode
    aligned = [p + offset if 0 <= p + offset < len(clean_ids) else None for p in positions]
    return PatchingResult(kind, values, layers, heads, positions, [decode([corrupted_ids[p]]) for p in positions],
                          [None if c is None else decode([clean_ids[c]]) for c in aligned],
                          float(clean_metric[0]), float(corrupted_metric[0]))


# ---------------------------------------------------------------------------------------------------- checks


def _metric(model: ModelHandle, answers: tuple[int, int] | None, metric: Metric | None) -> Metric:
    """The metric asked for: ``metric``, or the logit difference of ``answers`` (ids checked against the vocab)."""
    if (answers is None) == (metric is None):
        raise WorkbenchError("give either answers=(correct_id, wrong_id) for the logit difference or metric=a "
                             "function of the logits [batch, vocab] -> [batch], not both or neither")
    if metric is not None:
        return metric
    vocab = model.hf_model.config.get_text_config().vocab_size
    if (not isinstance(answers, (tuple, list)) or len(answers) != 2
            or not all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < vocab for a in answers)):
        raise WorkbenchError(f"answers must be two token ids (correct, wrong) in 0..{vocab - 1}, got {answers!r}")
    return logit_difference(*answers)


def _token_ids(model: ModelHandle, prompt: Prompt, which: str) -> list[int]:
    """A prompt's token ids: a text is tokenized with the tokenizer's special tokens; ids pass as they are."""
    if isinstance(prompt, str):
        ids = text_token_ids(model, [prompt])[0]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.squeeze(0).tolist() if prompt.dim() == 2 and prompt.shape[0] == 1 else prompt.tolist()
    else:
        ids = list(prompt)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise WorkbenchError(f"the {which} prompt must be a text or a non-empty list of token ids, got {prompt!r:.80}")
    return ids


def _offset(n_clean: int, n_corrupted: int, align: str | None) -> int:
    """Clean position = corrupted position + offset, by the alignment rule; equal lengths need none."""
    if align is not None and align not in ALIGNMENTS:
        raise WorkbenchError(f"unknown alignment {align!r}; choose one of {', '.join(ALIGNMENTS)}")
    if align is None and n_clean != n_corrupted:
        raise WorkbenchError(f"the clean prompt has {n_clean} tokens and the corrupted prompt {n_corrupted}: "
                             "patching pairs positions one to one; pass align='last' (pair the last tokens) or "
                             "align='first', or prompts of the same length")
    return n_clean - n_corrupted if align == "last" else 0


def _layers(model: ModelHandle, kind: str, layers: Sequence[int] | None) -> list[int]:
    """The layers to patch, checked: in range, and (attention, heads, MLP) having that component."""
    component = {"attn_out": "attn", "head": "attn", "mlp_out": "mlp"}.get(kind)
    writers = model.architecture.writers
    having = [b for b in range(model.n_layers)
              if component is None or any(w.layer == b and w.kind == component for w in writers)]
    if not having:
        raise WorkbenchError(f"{model.architecture.name} ({model.name}) has no {_COMPONENTS[component]} in any block; "
                             "patch 'resid_pre' or 'resid_post'")
    if layers is None:
        return having
    layers = list(layers)
    for b in layers:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < model.n_layers:
            raise WorkbenchError(f"layer {b!r} out of range: {model.name} has layers 0..{model.n_layers - 1}")
        if b not in having:
            raise WorkbenchError(_missing(model, b, component, having))
    return layers


_COMPONENTS = {"attn": "attention heads", "mlp": "MLP"}


def _missing(model: ModelHandle, layer: int, component: str, having: list[int]) -> str:
    """Why block ``layer`` cannot be patched at ``component``: what it has instead, and where the component is."""
    arch = model.architecture
    others = sorted({w.kind for w in arch.writers if w.layer == layer} - {component})
    return (f"block {layer} of {arch.name} ({model.name}) has no {_COMPONENTS[component]} (it writes to the residual "
            f"stream through: {', '.join(others) or 'nothing'}); patch it as 'resid_pre' or 'resid_post', or pick "
            f"layers among {having}")


def _heads(model: ModelHandle, heads: Sequence[int] | None) -> list[int]:
    n_heads = model.bridge.cfg.n_heads
    if heads is None:
        return list(range(n_heads))
    heads = list(heads)
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n_heads:
            raise WorkbenchError(f"head {h!r} out of range: {model.architecture.name} ({model.name}) has {n_heads} "
                                 f"attention heads per layer, 0..{n_heads - 1}")
    return heads


def _positions(positions: Sequence[int] | None, n_tokens: int) -> list[int]:
    """Positions of the corrupted prompt, negative ones counted from its end."""
    if positions is None:
        return list(range(n_tokens))
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_tokens <= p < n_tokens:
            raise WorkbenchError(f"position {p!r} out of range for the corrupted prompt of {n_tokens} tokens")
        out.append(p % n_tokens)
    return out


# --------------------------------------------------------------------------------------------------- running


def _route(model: ModelHandle, kind: str, layers: list[int]) -> _Route:
    """Where ``kind`` is replaced: the plain model's modules (residual blocks, attention output projections,
    attention / MLP outputs), else the bridge's hook points."""
    def hf_logits(ids: torch.Tensor) -> torch.Tensor:
        return model.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]

    if kind in ("resid_pre", "resid_post"):
        return _Route(lambda stack, layer, fn: stack.enter_context(
            replace_residual(model, {f"blocks.{layer}.hook_{kind}": fn})), hf_logits)
    if kind == "head":
        projections = {b: attention_output_projection(model.bridge, model.hf_model, b) for b in layers}
        return _Route(lambda stack, layer, fn: stack.callback(
            projections[layer].register_forward_pre_hook(_on_input(fn)).remove), hf_logits)
    outputs = {b: model.architecture.component_output(b, kind.removesuffix("_out")) for b in layers}
    if all(module is not None for module in outputs.values()):
        return _Route(lambda stack, layer, fn: stack.callback(
            outputs[layer].register_forward_hook(lambda module, args, out: map_output(out, fn)).remove), hf_logits)
    return _Route(lambda stack, layer, fn: stack.enter_context(model.bridge.hooks(
        fwd_hooks=[(f"blocks.{layer}.hook_{kind}", lambda tensor, hook: _or_same(fn(tensor), tensor))])),
        lambda ids: model.bridge(ids)[:, -1])


def _on_input(fn: Rewrite):
    """A forward pre-hook applying ``fn`` to a module's first input."""
    def hook(module, args):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])
    return hook


def _or_same(new: torch.Tensor | None, old: torch.Tensor) -> torch.Tensor:
    return old if new is None else new


def _row(model: ModelHandle, ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], device=model.device)


def _capture(route: _Route, layers: list[int], ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each layer's activation [seq, width] on one prompt (on the device where it was computed), and the logits."""
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int) -> Rewrite:
        return lambda x: seen.__setitem__(layer, x[0].detach().clone())
    with contextlib.ExitStack() as stack:
        for layer in layers:
            route.hook(stack, layer, record(layer))
        logits = route.logits(ids)
    missing = sorted(set(layers) - set(seen))
    if missing:
        raise RuntimeError(f"the patching hooks of layers {missing} did not fire")
    return seen, logits


def _scored(score: Metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric of each row [batch] as float64 on the CPU; a metric of another shape is refused."""
    values = score(logits.to(torch.promote_types(logits.dtype, torch.float32)))
    if not isinstance(values, torch.Tensor) or values.shape != logits.shape[:1]:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise WorkbenchError(f"the metric must map logits [batch, vocab] to one value per row [batch]: got {shape} "
                             f"for a batch of {logits.shape[0]}")
    return values.detach().double().cpu()


def _sites(layers: list[int], heads: list[int] | None, positions: list[int], by_position: bool, offset: int,
           n_clean: int) -> tuple[tuple[int, ...], list[tuple[int, _Site]]]:
    """The shape of the result and its sites, each with its flat index there; positions without an aligned clean
    token are left out (NaN in the result)."""
    valid = [p for p in positions if 0 <= p + offset < n_clean]
    if heads is None:
        grid = [(b, None, (p,)) for b in layers for p in positions]
        shape = (len(layers), len(positions))
    elif by_position:
        grid = [(b, h, (p,)) for b in layers for h in heads for p in positions]
        shape = (len(layers), len(heads), len(positions))
    else:
        grid = [(b, h, tuple(valid)) for b in layers for h in heads]
        shape = (len(layers), len(heads))
    sites = [(i, _Site(b, h, ps)) for i, (b, h, ps) in enumerate(grid) if ps and set(ps) <= set(valid)]
    return shape, sites


def _replacing(clean: torch.Tensor, rows: list[int], positions: list[int], heads: list[int | None], offset: int,
               n_heads: int | None) -> Rewrite:
    """A rewrite of a batch [batch, seq, width] that puts the clean activation [seq, width] at (row, position) (and
    head: features of width d_head, for ``n_heads`` heads) for each entry of the lists."""
    index = [torch.tensor(rows), torch.tensor(positions)]
    source = clean[index[1] + offset] if n_heads is None else \
        clean.view(clean.shape[0], n_heads, -1)[index[1] + offset, torch.tensor(heads)]
    if n_heads is not None:
        index.append(torch.tensor(heads))

    def rewrite(x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        target = x if n_heads is None else x.view(*x.shape[:2], n_heads, -1)
        target[tuple(i.to(x.device) for i in index)] = source.to(device=x.device, dtype=x.dtype)
        return x
    return rewrite


def _patched(route: _Route, score: Metric, clean: dict[int, torch.Tensor], corrupted: torch.Tensor,
             sites: list[_Site], offset: int, n_heads: int | None, batch_size: int, progress: bool
             ) -> torch.Tensor:
    """The metric with each site patched [len(sites)], ``batch_size`` sites per forward pass of the corrupted
    prompt."""
    chunks = [sites[i:i + batch_size] for i in range(0, len(sites), batch_size)]
    out = []
    for chunk in progress_bar(chunks, progress=progress, desc="patching", unit="batch"):
        entries: dict[int, tuple[list, list, list]] = {}
        for row, site in enumerate(chunk):
            rows, positions, heads = entries.setdefault(site.layer, ([], [], []))
            rows += [row] * len(site.positions)
            positions += site.positions
            heads += [site.head] * len(site.positions)
        with contextlib.ExitStack() as stack:
            for layer, (rows, positions, heads) in entries.items():
                route.hook(stack, layer, _replacing(clean[layer], rows, positions, heads, offset, n_heads))
            out.append(_scored(score, route.logits(corrupted.expand(len(chunk), -1))))
    return torch.cat(out)
