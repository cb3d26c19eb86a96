"""Command line: extract residual-stream activations of a dataset's entities (or a prompt file) into a cache.

    python -m probes.extract --model embedded --dataset world_place --n-prompts 200 --out runs/demo/extract
    python -m probes.extract --model embedded --prompts-file prompts.txt --positions=-3,-2,-1 --out runs/x
    torchrun --nproc-per-node 8 -m probes.extract --model M --dataset world_place --out runs/x   # one rank per GPU

Writes ``OUT/activations.safetensors`` (see :class:`probes.cache.ActivationCache`), ``OUT/results.json`` and the
report page ``OUT/index.html``; under
``torchrun`` the cache is the folder of shards ``OUT/activations`` (see :mod:`probes.distributed`). Every flag passes
through ``torchrun`` (none is a prefix of one of its options: :func:`probes.settings.check_torchrun_safe`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from probes import distributed
from probes.cache import extract, residual_hooks
from probes.cli_args import positive_int, run_cli
from probes.errors import WorkbenchError
from probes.files import atomic_write_json, prepare_run_folder
from probes.models import load_model
from probes.positions import mark_span
from probes.positions import validate as validate_positions
from probes.report import Page, Table, write_report
from probes.settings import ModelSettings, OutputSettings, parse_settings, setting

# What a run writes in its folder (the whole set is replaced by the next run with --overwrite).
OUTPUTS = ("results.json", "activations.safetensors", "activations", "index.html", "plotly.min.js")


def _parse_positions(text: str):
    """'last' and other modes stay strings; '-3,-2,-1' becomes a list of indices."""
    return [int(x) for x in text.split(",")] if re.fullmatch(r"-?\d+(,-?\d+)*", text) else text


@dataclass(kw_only=True)
class ExtractSettings(ModelSettings, OutputSettings):
    """What to extract, from which model, into which cache dtype (``dtype`` is the model's, ``cache_dtype`` the
    stored activations')."""

    dataset: str | None = setting(None, "an entity dataset name, e.g. world_place (see probes.datasets); "
                                        "or --prompts-file")
    prompts_file: Path | None = setting(None, "a text file with one prompt per line; or --dataset")
    template: str = setting("{entity}", "prompt template for dataset entities")
    n_prompts: int | None = setting(None, "prompts extracted: the most popular entities of --dataset, or the first "
                                          "lines of --prompts-file (default: all)", parse=positive_int)
    positions: str | list[int] | None = setting(
        None, "last | span_last | span_mean | comma-separated negative indices (write --positions=-3,-2,-1; "
              "default: span_last for datasets, last for prompt files)", parse=_parse_positions)
    cache_dtype: str = setting("float32", "dtype of the stored activations", choices=("float32", "bfloat16",
                                                                                         "float16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.dataset is None) == (self.prompts_file is None):
            raise WorkbenchError("give exactly one of --dataset and --prompts-file")


def _inputs(settings: ExtractSettings) -> tuple[list[str], list | None, str | list[int]]:
    """Prompts, entity spans (or None) and positions from the settings, checked before any model loads."""
    spans = None
    if settings.dataset:
        from probes.datasets import load_entities

        data = load_entities(settings.dataset, n=settings.n_prompts)
        marked = [mark_span(settings.template, e) for e in data.entities]
        prompts, spans = [p for p, _ in marked], [s for _, s in marked]
        positions = settings.positions or "span_last"
    else:
        path = settings.prompts_file
        if not path.is_file():
            raise FileNotFoundError(f"no prompts file at {path}; give a text file with one prompt per line")
        prompts = [line for line in path.read_text().splitlines() if line.strip()][: settings.n_prompts]
        if not prompts:
            raise WorkbenchError(f"{path} holds no prompts; write one prompt per line")
        positions = settings.positions or "last"
    return prompts, spans, validate_positions(positions, spans is not None)


def report_page(results: dict) -> Page:
    """The run's report page: settings, the extraction's numbers and the mean residual norm by layer."""
    import plotly.graph_objects as go

    norms = results["mean_norm_per_layer"]
    fig = go.Figure(go.Scatter(x=list(range(len(norms))), y=norms, mode="lines+markers"))
    fig.update_layout(title=f"{results['model']}: mean residual-stream norm by layer", template="plotly_white",
                      xaxis_title="hook point (0 = embeddings)", yaxis_title="mean L2 norm")
    where = {k: results[k] for k in ("device", "world_size", "cache") if k in results}
    numbers = Table("Extraction", ["", "value"], [
        ["prompts", results["n_prompts"]], ["hook points", len(results["hook_names"])],
        ["activations shape", " x ".join(map(str, results["shape"]))], ["seconds", results["seconds"]],
        ["prompts per second", results["prompts_per_second"]]])
    return Page(f"Activation extraction: {results['model']}", {**results["settings"], **where}, [numbers],
                {"mean_norm_by_layer": fig})


def main(argv: list[str] | None = None) -> dict:
    return run(parse_settings(ExtractSettings, argv, __doc__))


def run(settings: ExtractSettings) -> dict:
    """Extract as ``settings`` say into ``settings.out`` (one process, or every rank under ``torchrun``); the
    results dict that ``results.json`` holds."""
    prompts, spans, positions = _inputs(settings)
    if distributed.launched() and any(settings.placement().values()):
        raise WorkbenchError("--device-map/--max-memory/--offload-folder spread one model over the devices, torchrun "
                             "gives each process its own device: use one or the other")
    if os.environ.get("RANK", "0") == "0":  # one process prepares the folder, before any model is loaded
        prepare_run_folder(settings.out, OUTPUTS, settings.overwrite)
    device = distributed.setup(settings.device) if distributed.launched() else settings.device
    model = load_model(settings.model, **{**settings.load_kwargs(), "device": device})
    if distributed.launched():
        return _run_distributed(settings, model, prompts, spans, positions)
    start = time.perf_counter()
    cache = extract(model, prompts, hooks=residual_hooks(model), positions=positions, spans=spans,
                    dtype=getattr(torch, settings.cache_dtype))
    seconds = time.perf_counter() - start
    path = cache.save(settings.out / "activations.safetensors", overwrite=settings.overwrite)
    norms = cache.acts.float().norm(dim=-1).mean(dim=tuple(range(cache.acts.dim() - 2))).tolist()
    results = {"model": model.name, "n_prompts": len(prompts), "hook_names": cache.hook_names,
               "shape": list(cache.acts.shape), "dtype": settings.cache_dtype, "device": str(model.device),
               "seconds": seconds, "prompts_per_second": len(prompts) / seconds,
               "mean_norm_per_layer": norms, "cache": str(path), "settings": settings.to_dict()}
    atomic_write_json(settings.out / "results.json", results)
    write_report(settings.out, report_page(results))
    print(f"{model!r}\nextracted {len(prompts)} prompts x {len(cache.hook_names)} residual hook points "
          f"-> {tuple(cache.acts.shape)} {settings.cache_dtype} on {model.device} in {seconds:.1f} s "
          f"({len(prompts) / seconds:.0f} prompts/s)\nmean residual norm by layer: "
          + " ".join(f"{x:.0f}" for x in norms) + f"\nwrote {path} and {settings.out / 'results.json'}")
    return results


def _run_distributed(settings: ExtractSettings, model, prompts: list[str], spans, positions) -> dict:
    """Under torchrun: every rank extracts its share into the one sharded cache ``OUT/activations``; rank 0 writes
    results.json and prints."""
    try:
        start = time.perf_counter()
        cache = distributed.extract_distributed(model, prompts, settings.out / "activations", spans=spans,
                                                overwrite=settings.overwrite, hooks=residual_hooks(model),
                                                positions=positions, dtype=getattr(torch, settings.cache_dtype))
        seconds = time.perf_counter() - start
        norms = distributed.mean_norms(cache)
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    finally:
        distributed.teardown()
    n_positions = [] if isinstance(cache.meta["positions"], str) else [len(cache.meta["positions"])]
    shape = [len(cache), *n_positions, len(cache.hook_names), cache.meta["width"]]
    results = {"model": model.name, "n_prompts": len(prompts), "hook_names": cache.hook_names, "shape": shape,
               "dtype": settings.cache_dtype, "device": model.device.type, "world_size": world_size, "seconds": seconds,
               "prompts_per_second": len(prompts) / seconds, "mean_norm_per_layer": norms,
               "cache": str(cache.directory), "settings": settings.to_dict()}
    if rank == 0:
        atomic_write_json(settings.out / "results.json", results)
        write_report(settings.out, report_page(results))
        print(f"{model!r}\nextracted {len(prompts)} prompts on {world_size} ranks ({model.device.type}) -> "
              f"{tuple(shape)} {settings.cache_dtype} in {seconds:.1f} s ({len(prompts) / seconds:.0f} prompts/s)\n"
              f"wrote {cache.directory} and {settings.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main, kept="a cache is written only once complete; nothing half-written is left in --out")
