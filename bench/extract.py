"""Throughput of residual-stream extraction vs a plain forward pass and vs the naive ``run_with_cache`` path.

    python -m bench.extract                       # CPU: embedded model, small sizes
    python -m bench.extract --device cuda         # GPU: 1B-sized random Llama in bfloat16, 20,480 prompts

All paths see the same fixed-length random token batches, in the same run, so the ratios are comparable.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench.timing import sync
from probes.cache import extract, residual_hooks
from probes.models import ModelHandle, load_model


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="default: random:llama-1b on CUDA, embedded on the CPU")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--n-prompts", type=int, default=None, help="default: 20480 on CUDA, 256 on the CPU")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on the CPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="prompts for the run_with_cache paths (slow, memory-hungry); default: all")
    return parser


@dataclass
class Workload:
    """The model and the fixed-length random token batches every path sees."""

    model: ModelHandle
    ids: torch.Tensor
    batch: int
    n_naive: int
    dtype: torch.dtype

    @property
    def hooks(self) -> list[str]:
        return residual_hooks(self.model)


def _workload(args: argparse.Namespace) -> Workload:
    cuda = torch.device(args.device).type == "cuda"
    model = load_model(args.model or ("random:llama-1b" if cuda else "embedded"), device=args.device,
                       dtype=getattr(torch, args.dtype or ("bfloat16" if cuda else "float32")))
    n = args.n_prompts or (20480 if cuda else 256)
    ids = torch.randint(100, model.tokenizer.vocab_size, (n, args.seq_len), generator=torch.Generator().manual_seed(0))
    return Workload(model, ids, args.batch_size or (256 if cuda else 32), min(n, args.naive_prompts or n),
                    model.dtype)


def _plain_forward(w: Workload) -> Callable[[], None]:
    ids = w.ids.to(w.model.device)

    @torch.inference_mode()
    def run():
        for i in range(0, len(ids), w.batch):
            w.model.hf_model(input_ids=ids[i:i + w.batch], use_cache=False)
    return run


def _hidden_states_gather(w: Workload) -> Callable[[], torch.Tensor]:
    ids = w.ids.to(w.model.device)

    @torch.inference_mode()
    def run():
        out = torch.empty(len(ids), len(w.hooks), w.model.d_model, dtype=w.dtype, device=w.model.device)
        for i in range(0, len(ids), w.batch):
            hs = w.model.hf_model(input_ids=ids[i:i + w.batch], use_cache=False, output_hidden_states=True)
            out[i:i + w.batch] = torch.stack([h[:, -1] for h in hs.hidden_states], 1)
        return out
    return run


def _ours(w: Workload) -> Callable[[], object]:
    return lambda: extract(w.model, w.ids.tolist(), hooks=w.hooks, dtype=w.dtype,
                           batch_tokens=w.batch * w.ids.shape[1], progress=False)


def _naive(w: Workload, names_filter) -> Callable[[], torch.Tensor]:
    ids = w.ids.to(w.model.device)

    @torch.inference_mode()
    def run():
        rows = []
        for i in range(0, w.n_naive, w.batch):
            _, cache = w.model.bridge.run_with_cache(ids[i:i + w.batch], names_filter=names_filter)
            rows.append(torch.stack([cache[h][:, -1] for h in w.hooks], 1))
            del cache
        return torch.cat(rows)
    return run


def _report(w: Workload, rows: list[tuple[str, float, int]], rel: float) -> dict:
    speed = {name: tok / sec for name, sec, tok in rows}
    device = w.model.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nmodel {w.model.name} ({w.model.n_layers} layers, d_model {w.model.d_model}), {w.dtype}, {gpu}; "
          f"{len(w.ids)} prompts x {w.ids.shape[1]} tokens, batch {w.batch}; {len(w.hooks)} residual hooks at the "
          "last token")
    print(f"{'path':50s} {'seconds':>9s} {'tokens/s':>12s}")
    for name, sec, tok in rows:
        print(f"{name:50s} {sec:9.3f} {tok / sec:12,.0f}")
    b, a, c = speed[rows[2][0]], speed[rows[0][0]], speed[rows[3][0]]
    print(f"\nratio b/a (extract vs plain forward): {b / a:.2f}x")
    print(f"ratio b/c (extract vs naive run_with_cache, all hooks): {b / c:.2f}x")
    print(f"ratio b/(resid-filtered run_with_cache): {b / speed[rows[4][0]]:.2f}x")
    print(f"max relative difference vs output_hidden_states: {rel:.2e}")
    return {"speed": speed, "b_over_a": b / a, "b_over_c": b / c}


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    w = _workload(args)
    device, tokens, naive_tokens = w.model.device, w.ids.numel(), w.n_naive * w.ids.shape[1]
    rows = [
        ("(a) plain HF forward, no hooks", timed(_plain_forward(w), device, args.repeats), tokens),
        ("    HF output_hidden_states + gather", timed(_hidden_states_gather(w), device, args.repeats), tokens),
        ("(b) workbench extract (all resid, last token)", timed(_ours(w), device, args.repeats), tokens),
        ("(c) bridge run_with_cache, all hooks", timed(_naive(w, None), device, 1), naive_tokens),
        ("    bridge run_with_cache, resid hooks only", timed(_naive(w, lambda h: h in w.hooks), device, 1),
         naive_tokens),
    ]
    check, ref = _ours(w)().acts[:, :-1].float(), _hidden_states_gather(w)()[:, :-1].float()
    rel = ((check - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
    return _report(w, rows, rel)


if __name__ == "__main__":
    main()
