"""Generation throughput of every method SpARE is compared with, as a ratio to unedited generation, measured side by
side in one run on the same test prompts (greedy, short answers).

    python -m bench.spare_methods                            # the embedded model, its shipped SAEs, 64 prompts
    python -m bench.spare_methods --n-prompts 256 --device cuda

Each method answers with one fixed setting (the middle of its default grid); fitting (SAE latents, directions, the
activations TaskVec and SEA are fitted from) is done once beforehand and not timed. CAD runs two conditionings per
step in one batch; DoLa reads every candidate layer's hidden state per step; ICL's prompts are longer.
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import timed
from probes.models import load_model
from steering import spare, spare_protocol
from steering.spare_methods import METHODS

SETTINGS = {"cad": {"alpha": 1.0}, "dola": {"bucket": "high"}, "sea": {"keep": 0.9}, "actadd": {"strength": 1.0},
            "spare": {"strength": 1.0, "remove": True}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n-prompts", type=int, default=64, help="test prompts each method answers")
    parser.add_argument("--n-train", type=int, default=120, help="training facts the methods are fitted on")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    settings = spare.SpareSettings(model=args.model, n_seeds=1, max_new_tokens=args.max_new_tokens,
                                   taskvec_layers=None)
    model = load_model(args.model, device=args.device)
    saes, examples = spare.load_inputs(model, settings)
    train, test = examples[:args.n_train], examples[args.n_train:args.n_train + args.n_prompts]
    run, _ = spare_protocol.fit_seed(model, saes, train, settings, seed=0, progress=False)
    SETTINGS["taskvec"] = {"layer": next(iter(run.taskvec_hooks))}
    device, rows = torch.device(args.device), {}
    for name, method in METHODS.items():  # toward memory: every method steers that way
        method.answer(model, run, test[:2], "memory", SETTINGS.get(name, {}))  # warm-up
        setting = SETTINGS.get(name, {})
        rows[name], _ = timed(lambda m=method, s=setting: m.answer(model, run, test, "memory", s), device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.model} on {where}: {len(test)} prompts, up to {args.max_new_tokens} new tokens each, toward memory")
    print(f"{'method':14s} {'seconds':>9s} {'prompts/s':>10s} {'vs no edit':>11s}")
    for name, seconds in rows.items():
        print(f"{name:14s} {seconds:9.2f} {len(test) / seconds:10.1f} {rows['no_edit'] / seconds:10.2f}x")
    return {name: {"seconds": s, "ratio_to_no_edit": rows["no_edit"] / s} for name, s in rows.items()}


if __name__ == "__main__":
    main()
