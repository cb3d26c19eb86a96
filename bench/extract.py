"""Throughput of residual-stream extraction vs a plain forward pass and vs the naive ``run_with_cache`` path.

    python -m bench.extract                       # CPU: embedded model, small sizes
    python -m bench.extract --device cuda         # GPU: 1B-sized random Llama in bfloat16, 20,480 prompts

All paths see the same fixed-length random token batches, in the same run, so the ratios are comparable.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bench.timing import sync

from probes.cache import extract, residual_hooks
from probes.models import load_model


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


def main(argv: list[str] | None = None) -> dict:
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
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model_name = args.model or ("random:llama-1b" if cuda else "embedded")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    n = args.n_prompts or (20480 if cuda else 256)
    bs = args.batch_size or (256 if cuda else 32)
    model = load_model(model_name, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.tokenizer.vocab_size, (n, args.seq_len), generator=gen)
    ids_dev = ids.to(device)
    hooks = residual_hooks(model)
    tokens = n * args.seq_len
    n_naive = min(n, args.naive_prompts or n)
    bridge = model.bridge

    @torch.inference_mode()
    def plain_forward():
        for i in range(0, n, bs):
            model.hf_model(input_ids=ids_dev[i:i + bs], use_cache=False)

    @torch.inference_mode()
    def hidden_states_gather():
        out = torch.empty(n, len(hooks), model.d_model, dtype=dtype, device=device)
        for i in range(0, n, bs):
            hs = model.hf_model(input_ids=ids_dev[i:i + bs], use_cache=False, output_hidden_states=True).hidden_states
            out[i:i + bs] = torch.stack([h[:, -1] for h in hs], 1)
        return out

    def ours():
        return extract(model, ids.tolist(), hooks=hooks, dtype=dtype, batch_tokens=bs * args.seq_len, progress=False)

    def naive(names_filter):
        @torch.inference_mode()
        def run():
            rows = []
            for i in range(0, n_naive, bs):
                _, cache = bridge.run_with_cache(ids_dev[i:i + bs], names_filter=names_filter)
                rows.append(torch.stack([cache[h][:, -1] for h in hooks], 1))
                del cache
            return torch.cat(rows)
        return run

    rows = [
        ("(a) plain HF forward, no hooks", timed(plain_forward, device, args.repeats), tokens),
        ("    HF output_hidden_states + gather", timed(hidden_states_gather, device, args.repeats), tokens),
        ("(b) workbench extract (all resid, last token)", timed(ours, device, args.repeats), tokens),
        ("(c) bridge run_with_cache, all hooks", timed(naive(None), device, 1), n_naive * args.seq_len),
        ("    bridge run_with_cache, resid hooks only", timed(naive(lambda h: h in hooks), device, 1),
         n_naive * args.seq_len),
    ]
    check = ours().acts
    ref = hidden_states_gather()
    rel = ((check[:, :-1].float() - ref[:, :-1].float()).abs().amax(-1) / ref[:, :-1].float().abs().amax(-1)).max()
    speed = {name: tok / sec for name, sec, tok in rows}
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nmodel {model_name} ({model.n_layers} layers, d_model {model.d_model}), {dtype}, {gpu}; "
          f"{n} prompts x {args.seq_len} tokens, batch {bs}; {len(hooks)} residual hooks at the last token")
    print(f"{'path':50s} {'seconds':>9s} {'tokens/s':>12s}")
    for name, sec, tok in rows:
        print(f"{name:50s} {sec:9.3f} {tok / sec:12,.0f}")
    b, a, c = speed[rows[2][0]], speed[rows[0][0]], speed[rows[3][0]]
    print(f"\nratio b/a (extract vs plain forward): {b / a:.2f}x")
    print(f"ratio b/c (extract vs naive run_with_cache, all hooks): {b / c:.2f}x")
    print(f"ratio b/(resid-filtered run_with_cache): {b / speed[rows[4][0]]:.2f}x")
    print(f"max relative difference vs output_hidden_states: {rel.item():.2e}")
    return {"speed": speed, "b_over_a": b / a, "b_over_c": b / c}


if __name__ == "__main__":
    main()
