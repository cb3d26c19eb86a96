"""Command line: extract residual-stream activations of a dataset's entities (or a prompt file) into a cache.

    python -m probes.extract --model embedded --dataset world_place --n 200 --out runs/demo/extract
    python -m probes.extract --model embedded --prompts-file prompts.txt --positions=-3,-2,-1 --out runs/x
    torchrun --nproc-per-node 8 -m probes.extract --model M --dataset world_place --out runs/x   # one rank per GPU

Writes ``OUT/activations.safetensors`` (see :class:`probes.cache.ActivationCache`), ``OUT/results.json`` and the
report page ``OUT/index.html``; under
``torchrun`` the cache is the folder of shards ``OUT/activations`` (see :mod:`probes.distributed`).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch

from probes import distributed
from probes.cache import extract, residual_hooks
from probes.cli_args import ArgumentParser, add_placement_args, placement, positive_int, run_cli
from probes.errors import WorkbenchError
from probes.files import atomic_write_json, prepare_run_folder
from probes.models import load_model
from probes.positions import mark_span
from probes.positions import validate as validate_positions
from probes.report import Page, Table, write_report


# What a run writes in its folder (the whole set is replaced by the next run with --overwrite).
OUTPUTS = ("results.json", "activations.safetensors", "activations", "index.html", "plotly.min.js")


def _parse_positions(text: str):
    """'last' and other modes stay strings; '-3,-2,-1' becomes a list of indices."""
    return [int(x) for x in text.split(",")] if re.fullmatch(r"-?\d+(,-?\d+)*", text) else text


def _inputs(args: argparse.Namespace) -> tuple[list[str], list | None, str | list[int]]:
    """Prompts, entity spans (or None) and positions from the arguments, checked before any model loads."""
    spans = None
    if args.dataset:
        from probes.datasets import load_entities

        data = load_entities(args.dataset, n=args.n)
        marked = [mark_span(args.template, e) for e in data.entities]
        prompts, spans = [p for p, _ in marked], [s for _, s in marked]
        positions = _parse_positions(args.positions or "span_last")
    else:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"no prompts file at {args.prompts_file}; give a text file with one prompt per line")
        prompts = [line for line in args.prompts_file.read_text().splitlines() if line.strip()][: args.n]
        if not prompts:
            raise WorkbenchError(f"{args.prompts_file} holds no prompts; write one prompt per line")
        positions = _parse_positions(args.positions or "last")
    return prompts, spans, validate_positions(positions, spans is not None)


def report_page(results: dict) -> Page:
    """The run's report page: settings, the extraction's numbers and the mean residual norm by layer."""
    import plotly.graph_objects as go

    norms = results["mean_norm_per_layer"]
    fig = go.Figure(go.Scatter(x=list(range(len(norms))), y=norms, mode="lines+markers"))
    fig.update_layout(title=f"{results['model']}: mean residual-stream norm by layer", template="plotly_white",
                      xaxis_title="hook point (0 = embeddings)", yaxis_title="mean L2 norm")
    settings = {k: results[k] for k in ("model", "dtype", "device", "world_size", "cache") if k in results}
    numbers = Table("Extraction", ["", "value"], [
        ["prompts", results["n_prompts"]], ["hook points", len(results["hook_names"])],
        ["activations shape", " x ".join(map(str, results["shape"]))], ["seconds", results["seconds"]],
        ["prompts per second", results["prompts_per_second"]]])
    return Page(f"Activation extraction: {results['model']}", settings, [numbers], {"mean_norm_by_layer": fig})


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--model", default="embedded")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="an entity dataset name, e.g. world_place (see probes.datasets)")
    source.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--template", default="{entity}", help="prompt template for dataset entities")
    parser.add_argument("--n", type=positive_int, default=None, help="number of entities (most popular first)")
    parser.add_argument("--positions", default=None,
                        help="last | span_last | span_mean | comma-separated negative indices "
                             "(write --positions=-3,-2,-1; default: span_last for datasets, last for prompt files)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None)
    add_placement_args(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    args = parser.parse_args(argv)
    prompts, spans, positions = _inputs(args)
    if distributed.launched() and any(placement(args).values()):
        raise WorkbenchError("--device-map/--max-memory/--offload-folder spread one model over the devices, torchrun "
                             "gives each process its own device: use one or the other")
    if os.environ.get("RANK", "0") == "0":  # one process prepares the folder, before any model is loaded
        prepare_run_folder(args.out, OUTPUTS, args.overwrite)
    model = load_model(args.model, device=distributed.setup(args.device) if distributed.launched() else args.device,
                       **placement(args))
    if distributed.launched():
        return _main_distributed(args, model, prompts, spans, positions)
    start = time.perf_counter()
    cache = extract(model, prompts, hooks=residual_hooks(model), positions=positions, spans=spans,
                    dtype=getattr(torch, args.dtype))
    seconds = time.perf_counter() - start
    path = cache.save(args.out / "activations.safetensors", overwrite=args.overwrite)
    norms = cache.acts.float().norm(dim=-1).mean(dim=tuple(range(cache.acts.dim() - 2))).tolist()
    results = {"model": model.name, "n_prompts": len(prompts), "hook_names": cache.hook_names,
               "shape": list(cache.acts.shape), "dtype": args.dtype, "device": str(model.device),
               "seconds": seconds, "prompts_per_second": len(prompts) / seconds,
               "mean_norm_per_layer": norms, "cache": str(path)}
    atomic_write_json(args.out / "results.json", results)
    write_report(args.out, report_page(results))
    print(f"{model!r}\nextracted {len(prompts)} prompts x {len(cache.hook_names)} residual hook points "
          f"-> {tuple(cache.acts.shape)} {args.dtype} on {model.device} in {seconds:.1f} s "
          f"({len(prompts) / seconds:.0f} prompts/s)\nmean residual norm by layer: "
          + " ".join(f"{x:.0f}" for x in norms) + f"\nwrote {path} and {args.out / 'results.json'}")
    return results


def _main_distributed(args: argparse.Namespace, model, prompts: list[str], spans, positions) -> dict:
    """Under torchrun: every rank extracts its share into the one sharded cache ``OUT/activations``; rank 0 writes
    results.json and prints."""
    try:
        start = time.perf_counter()
        cache = distributed.extract_distributed(model, prompts, args.out / "activations", spans=spans,
                                                overwrite=args.overwrite, hooks=residual_hooks(model),
                                                positions=positions, dtype=getattr(torch, args.dtype))
        seconds = time.perf_counter() - start
        norms = distributed.mean_norms(cache)
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    finally:
        distributed.teardown()
    n_positions = [] if isinstance(cache.meta["positions"], str) else [len(cache.meta["positions"])]
    shape = [len(cache), *n_positions, len(cache.hook_names), cache.meta["width"]]
    results = {"model": model.name, "n_prompts": len(prompts), "hook_names": cache.hook_names, "shape": shape,
               "dtype": args.dtype, "device": model.device.type, "world_size": world_size, "seconds": seconds,
               "prompts_per_second": len(prompts) / seconds, "mean_norm_per_layer": norms,
               "cache": str(cache.directory)}
    if rank == 0:
        atomic_write_json(args.out / "results.json", results)
        write_report(args.out, report_page(results))
        print(f"{model!r}\nextracted {len(prompts)} prompts on {world_size} ranks ({model.device.type}) -> "
              f"{tuple(shape)} {args.dtype} in {seconds:.1f} s ({len(prompts) / seconds:.0f} prompts/s)\n"
              f"wrote {cache.directory} and {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_cli(main)
