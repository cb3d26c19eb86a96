"""Section 5 of Arditi et al. (2024) on the refusal organism: does an adversarial (GCG) suffix jailbreak it, by
suppressing the refusal direction, because the heads that write the direction attend to the suffix instead of the
instruction?

    python -m steering.suffix_attack --model embedded-refuser --direction runs/refusal --out runs/suffix_attack \\
        --suffix data/refusal/gcg_suffix.json

``--direction``: a refusal run's folder (``python -m steering.refusal``), whose selected direction r̂ is read;
``--suffix``: a GCG result (:class:`steering.gcg.GCGResult`) to reuse; without it the search runs first on one
harmful training instruction and saves ``OUT/gcg_suffix.json``. On held-out harmful instructions in three
conditions (no suffix, a random suffix of the same token length, the adversarial suffix) it measures the refusal
rate, the cosine of the last token's residual stream with r̂ at every layer, the direct attribution of every head
to r̂ at the last token (:func:`probes.attribution.attribute`, read where r̂ was selected) and the attention of the
top heads from the last token to the instruction's and the suffix's tokens. Writes ``OUT/results.json``, the
figures and ``OUT/index.html``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from probes.attribution import attention_mass, attention_patterns, attribute, top_heads
from probes.cli_args import positive_int, run_cli
from probes.datasets import load_refusal_instructions
from probes.files import atomic_write_json, prepare_run_folder
from probes.forward import generate_from_ids
from probes.metrics import paired_bootstrap, rate_with_interval
from probes.models import ModelHandle, load_model
from probes.settings import BatchSettings, ModelSettings, RunSettings, parse_settings, setting
from steering import suffix_plots
from steering.directions import SelectedDirection
from steering.gcg import GCGConfig, GCGResult, allowed_tokens, attack_prompt, gcg
from steering.judges import refusals
from steering.refusal import expression_of_ids, load_selection

CONDITIONS = ("none", "random", "adversarial")
OUTPUTS = ("results.json", "gcg_suffix.json", *suffix_plots.FIGURE_FILES)


@dataclass(kw_only=True)
class SuffixAttackSettings(ModelSettings, RunSettings, BatchSettings):
    """The refusal run to read r̂ from, the suffix (reused or searched), the held-out set and the heads shown."""

    model: str = setting("embedded-refuser", "model: embedded-refuser, random:<preset>, a Hugging Face id or folder")
    direction: Path | None = setting(None, "a refusal run's folder (python -m steering.refusal --out ...)", parse=Path,
                                     required=True)
    suffix: Path | None = setting(None, "a saved GCG result to reuse (e.g. data/refusal/gcg_suffix.json); none: "
                                        "run the search", parse=Path)
    target: str = setting("Sure, here is", "the answer the suffix is optimised to start")
    train_index: int = setting(0, "which harmful training instruction the suffix is optimised on", parse=int)
    steps: int = setting(50, "GCG steps at most", parse=positive_int)
    search_width: int = setting(32, "GCG candidates per step", parse=positive_int)
    topk: int = setting(64, "GCG tokens considered per suffix position", parse=positive_int)
    max_seconds: float | None = setting(None, "stop the GCG search after the step that passes this wall time",
                                        parse=float)
    n_test: int = setting(32, "held-out harmful instructions", parse=positive_int)
    max_new_tokens: int = setting(32, "tokens generated per completion", parse=positive_int)
    top_heads: int = setting(8, "heads shown, by direct attribution to r̂", parse=positive_int)


def instruction_span(model: ModelHandle, instruction: str) -> tuple[int, int]:
    """[start, stop) of the instruction's tokens in its chat prompt (:func:`steering.gcg.attack_prompt`'s
    ``before``)."""
    before = attack_prompt(model, instruction, "").before
    text = model.format_chat(instruction)
    head = text[:text.index(instruction)]
    return len(model.tokenizer(head, add_special_tokens=False)["input_ids"]), len(before)


def random_suffix(model: ModelHandle, length: int, seed: int) -> list[int]:
    """``length`` tokens drawn uniformly from those a GCG suffix may use."""
    allowed = allowed_tokens(model).nonzero().flatten()
    pick = torch.randint(0, len(allowed), (length,), generator=torch.Generator().manual_seed(seed))
    return allowed[pick].tolist()


def condition_ids(model: ModelHandle, instructions: Sequence[str], suffixes: dict[str, list[int]], target: str
                  ) -> dict[str, list[list[int]]]:
    """Token ids of every instruction with each condition's suffix after it, in the chat template."""
    prompts = [attack_prompt(model, text, target) for text in instructions]
    return {name: [p.ids(suffix) for p in prompts] for name, suffix in suffixes.items()}


def expression(model: ModelHandle, ids: list[list[int]], selected: SelectedDirection) -> torch.Tensor:
    """Cosine of r̂ with the last token's stream entering every block, r̂'s left-out dimensions left out: [n, L]."""
    return expression_of_ids(model, ids, selected.vector, range(model.n_layers), selected.excluded_dims)


def head_attributions(model: ModelHandle, ids: list[list[int]], selected: SelectedDirection) -> torch.Tensor:
    """Every head's direct attribution to r̂ at the last token, in the stream entering r̂'s block: [n, layers,
    heads] (blocks before it only)."""
    layer = max(int(selected.layer or model.n_layers) - 1, 0)
    return torch.stack([attribute(model, row, selected.vector, layer).heads[..., -1] for row in ids])


def attention_split(model: ModelHandle, ids: list[list[int]], spans: list[tuple[int, int]], suffix_len: int,
                    heads: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Attention from the last token of each prompt to the instruction and to the suffix, per head in ``heads``:
    by span name, [n, len(heads)]."""
    layers = sorted({layer for layer, _ in heads})
    out: dict[str, list[torch.Tensor]] = {"instruction": [], "suffix": []}
    for row, (start, stop) in zip(ids, spans, strict=True):
        patterns = attention_patterns(model, row, layers)[:, :, 0]  # [layers, heads, keys]
        mass = attention_mass(patterns, {"instruction": (start, stop), "suffix": (stop, stop + suffix_len)})
        for name, value in mass.items():
            out[name].append(torch.stack([value[layers.index(layer), head] for layer, head in heads]))
    return {name: torch.stack(values) for name, values in out.items()}


def find_suffix(model: ModelHandle, settings: SuffixAttackSettings) -> GCGResult:
    """The saved suffix (``--suffix``) or a new GCG search on the training instruction, saved in ``OUT``."""
    if settings.suffix is not None:
        return GCGResult.load(settings.suffix)
    instruction = load_refusal_instructions("train", "harmful")[settings.train_index]
    config = GCGConfig(steps=settings.steps, search_width=settings.search_width, topk=settings.topk,
                       max_seconds=settings.max_seconds, seed=settings.seed, batch_size=settings.batch_size)
    result = gcg(model, instruction, settings.target, config)
    result.save(Path(settings.out) / "gcg_suffix.json", model)
    return result


def _summaries(refused: dict, cos: dict, att: dict, attn: dict, layer: int, heads: list) -> dict:
    """results.json's measurements: rates, expression by layer, head attributions and attention by condition."""
    at = min(layer, next(iter(cos.values())).shape[1] - 1)
    return {
        "refusal": {c: rate_with_interval(refused[c]) for c in CONDITIONS},
        "refusal_vs_none": {c: paired_bootstrap(torch.tensor(refused[c], dtype=torch.float64),
                                                torch.tensor(refused["none"], dtype=torch.float64))
                            for c in CONDITIONS[1:]},
        "expression": {"layers": list(range(next(iter(cos.values())).shape[1])), "at_layer": at,
                       **{c: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "n": len(v)}
                          for c, v in cos.items()},
                       "vs_none_at_layer": {c: paired_bootstrap(cos[c][:, at], cos["none"][:, at])
                                            for c in CONDITIONS[1:]}},
        "top_heads": [{"layer": lh[0], "head": lh[1],
                       "attribution": {c: float(att[c][:, lh[0], lh[1]].mean()) for c in CONDITIONS},
                       **{span: {c: float(attn[c][span][:, i].mean()) for c in CONDITIONS}
                          for span in ("instruction", "suffix")}} for i, lh in enumerate(heads)],
        "attribution_by_head": {c: att[c].mean(0).tolist() for c in CONDITIONS},
    }


def measure(model: ModelHandle, settings: SuffixAttackSettings, selected: SelectedDirection, found: GCGResult
            ) -> tuple[dict, dict[str, list[str]]]:
    """Every measurement in the three conditions on the held-out harmful instructions, and the completions."""
    instructions = load_refusal_instructions("test", "harmful")[:settings.n_test]
    suffixes = {"none": [], "random": random_suffix(model, len(found.suffix_ids), settings.seed),
                "adversarial": list(found.suffix_ids)}
    ids = condition_ids(model, instructions, suffixes, settings.target)
    texts = {c: generate_from_ids(model, ids[c], settings.max_new_tokens, settings.batch_size, progress=False)
             for c in CONDITIONS}
    refused = {c: refusals(instructions, texts[c]) for c in CONDITIONS}
    cos = {c: expression(model, ids[c], selected) for c in CONDITIONS}
    att = {c: head_attributions(model, ids[c], selected) for c in CONDITIONS}
    heads = [(layer, head) for layer, head, _ in top_heads(att["none"].mean(0), settings.top_heads)]
    spans = [instruction_span(model, text) for text in instructions]
    attn = {c: attention_split(model, ids[c], spans, len(suffixes[c]), heads) for c in CONDITIONS}
    summary = _summaries(refused, cos, att, attn, int(selected.layer or 0), heads)
    return {**summary, "n": len(instructions), "random_suffix": model.tokenizer.decode(suffixes["random"])}, texts


def run(settings: SuffixAttackSettings, model: ModelHandle | None = None) -> dict:
    """The whole analysis; writes ``OUT/results.json``, the figures and ``OUT/index.html``."""
    start = time.perf_counter()
    out = prepare_run_folder(settings.out, OUTPUTS, settings.overwrite)
    model = model or load_model(settings.model, **settings.load_kwargs())
    selected = load_selection(settings.direction, model)
    found = find_suffix(model, settings)
    measured, texts = measure(model, settings, selected, found)
    results = {"settings": settings.to_dict(), "model": model.name, "suffix": found.to_dict(),
               "direction": {"run": str(settings.direction), "layer": selected.layer, "position": selected.position},
               **measured, "completions": {c: texts[c][:8] for c in CONDITIONS},
               "seconds": time.perf_counter() - start}
    atomic_write_json(out / "results.json", results)
    suffix_plots.write_all(out, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse_settings(SuffixAttackSettings, argv, __doc__.split("\n\n")[0]))


if __name__ == "__main__":
    run_cli(main, kept="results.json and the report are written only at the end")
